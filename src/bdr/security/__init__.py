"""How the daemons trust each other: the shared-secret exchange (``auth``), TLS 1.3 contexts and streams
(``tls``), and the private CA and certificates ``bdr certs`` makes (``certs``).  Each daemon turns its flags into
these in its own ``load_security``."""
