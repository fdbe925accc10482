"""The training-job queue and the worker process that runs it (claims, heartbeats, stale-job recovery, thread and
process bookkeeping)."""
