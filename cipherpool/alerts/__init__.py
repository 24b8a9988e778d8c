"""Performance alerts: thresholds on a model's query figures, evaluated by beat.

* :mod:`cipherpool.alerts.rules`: setting, listing and removing rules, and their events (a
  service: it takes a session, the caller owns the transaction);
* :mod:`cipherpool.scheduler.alerts`: beat's job, which fires and clears them;
* :mod:`cipherpool.alerts.webhook`: the signed, retried webhook call of each event;
* :mod:`cipherpool.alerts.signature`: signing and verifying a call, with the standard library
  only, so that a receiver can import it without the platform's server side;
* :mod:`cipherpool.alerts.destination`: where a webhook may point (no private addresses).

Nothing here is on a query's path: beat reads the figures the node hooks recorded, and the
control worker makes the calls.
"""
