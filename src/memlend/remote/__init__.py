"""Client side of the remote tier: wire protocol (sans-I/O), sealing, blocking client."""
