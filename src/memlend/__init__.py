"""memlend: a user-space, two-level file cache that pools the idle memory of VMs."""

__version__ = "0.1.0"
