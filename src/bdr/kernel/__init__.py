"""The kernel side, seen from userspace: the mirror of the target's ABI (``abi``), the ring's layout
(``layout``), the ring consumer (``ring``) and the dirty bitmap it hands over (``dirty``)."""
