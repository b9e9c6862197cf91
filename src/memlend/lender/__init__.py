"""The lender daemon: block store, host-memory watcher, network loop."""
