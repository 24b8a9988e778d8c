"""Credits: the ledger, periodic deduction for worker runtime, auto-stop at zero.

Empty until its issue; queries will be refused with a typed error when an account has no
credit, next to the token and model checks in `services/queries.py`.
"""
