"""What both daemons run on: the wake-up channel of their main loop (signals, requests from other threads) and
the socket options and closing rules of their TCP connections."""
