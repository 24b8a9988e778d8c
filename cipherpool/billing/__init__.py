"""Credits: an exact, append-only ledger per account; worker runtime charged by beat; shared-
node execution charged from the nodes' tallies; auto-stop at zero; usage and reports.

* :mod:`.money` — amounts: integers of micro-credits, shown as ``Decimal`` credits;
* :mod:`.rates` — prices per host class or node profile, kept as a history;
* :mod:`.ledger` — appending a line (keyed, so a duplicate is refused), balances, history;
* :mod:`.charging` — what a worker or a shared-node minute owes, and beat's tick;
* :mod:`.usage` — runtime, cost and queries per model, worker and day; reports;
* :mod:`.payments` — the payment-provider interface behind a purchase.
"""
