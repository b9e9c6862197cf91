"""Prometheus exposition (`--metrics ADDR:PORT`) of a mount's and a lender's counters.

The collectors read the same snapshots as `memlend stats --json` at scrape time, so
the hot path pays nothing for the endpoint (docs/operations.md)."""
