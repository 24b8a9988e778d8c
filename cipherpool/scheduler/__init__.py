"""Beat's jobs over the pool: worker schedules (:mod:`.windows`, :mod:`.schedules`,
:mod:`.tick`) and autoscaling (:mod:`.autoscale`). Billing has its own package
(:mod:`cipherpool.billing`), alerts theirs (:mod:`cipherpool.alerts`); reconciliation is
:func:`cipherpool.scheduler.reconcile.reconcile`. Each job reads the database afresh and claims what
it applies, so beat may restart, miss ticks or run twice.
"""
