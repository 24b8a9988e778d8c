"""The runtime of the platform's worker processes (``celery worker``), pool nodes above all.

Vocabulary: a *pool node* is a persistent ``celery worker`` process; a *worker* is a model's
serving unit, bound to one pool node while it runs (what a provider starts and stops). This
package is what runs inside those processes: the shared platform context, a node's state
(:mod:`.node`), binding and unbinding a model (:mod:`.binding`), the query hot path
(:mod:`.query`), the hooks around both (:mod:`.hooks`; statistics are the first,
:mod:`.stats`) and the Celery signal handlers (:mod:`.signals`).
"""
