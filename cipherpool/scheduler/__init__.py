"""Beat jobs: worker schedules, reconciliation of desired vs running workers, alerts.

Empty until its issue: `cipherpool up` already runs beat (with no jobs yet), and node
heartbeats plus database bindings are in place for reconciliation to build on.
"""
