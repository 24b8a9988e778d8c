"""Names shared by every process: queues, task names, Redis key prefixes.

The one place where they are spelled: senders (the gateway, in-cluster code, lifecycle) and
receivers (the tasks a pool node registers) import the same constants, so a renamed task can
never leave a sender publishing to nobody.
"""

CONTROL_QUEUE = "cipherpool.control"  # management tasks, consumed by control workers
POOL_QUEUE = "cipherpool.pool"  # a worker consuming this is a pool node (its role marker)
NODE_QUEUE_PREFIX = "cipherpool.node."  # + node name: tasks for one node (bind, unbind, stats)
MODEL_QUEUE_PREFIX = "cipherpool.model."  # + host class + "." + model id: the encrypted queries of one model
SHARED_QUEUE_PREFIX = "cipherpool.shared."  # + host class: queries for shared nodes of that class
AFFINITY_QUEUE_PREFIX = "cipherpool.affinity."  # + model routing key + "@" + node: one node's share of a model's key sets
QUERY_EXCHANGE = "cipherpool.queries"  # direct exchange of every query; routing key = query_routing_key()

TASK_PREFIX = "cipherpool."
QUERY_TASK = TASK_PREFIX + "query.run"  # one encrypted query, on its model's queue
QUERY_BATCH_TASK = TASK_PREFIX + "query.batch"  # a batch of queries (one model, one key set), on its model's queue
BIND_TASK = TASK_PREFIX + "node.bind"  # node queue: load a model and consume its queue
UNBIND_TASK = TASK_PREFIX + "node.unbind"  # node queue: stop consuming, unload
STATS_TASK = TASK_PREFIX + "node.stats"  # node queue: the node's live figures
WARM_TASK = TASK_PREFIX + "node.warm"  # node queue: one throwaway evaluation with a new key set
CONSUME_TASK = TASK_PREFIX + "node.consume"  # node queue: consume its model's queue or not (standby), as the row says
RECONCILE_TASK = TASK_PREFIX + "control.reconcile"  # beat, control queue: fail workers of lost nodes, replace them
BILLING_TASK = TASK_PREFIX + "control.billing"  # beat, control queue: charge workers and shared execution, stop at zero
SCHEDULE_TASK = TASK_PREFIX + "control.schedules"  # beat, control queue: apply worker schedules' starts and stops
ALERTS_TASK = TASK_PREFIX + "control.alerts"  # beat, control queue: evaluate alert rules
AUTOSCALE_TASK = TASK_PREFIX + "control.autoscale"  # beat, control queue: add or remove workers of autoscaled models
WEBHOOK_TASK = TASK_PREFIX + "control.webhook"  # control queue: deliver one alert event to its webhook (retried)
RELOAD_TASK = TASK_PREFIX + "node.reload"  # node queue: load the versions its model must hold
KEY_SWEEP_TASK = TASK_PREFIX + "control.keys"  # beat, control queue: key sets' last use, idle expiry, unreferenced blobs

BLOB_PREFIX = "cipherpool:blob:"  # + kind + ":" + sha256 hex; content-addressed, no TTL
PAYLOAD_PREFIX = "cipherpool:payload:"  # + uuid; large query payloads, with a TTL
UPLOAD_PREFIX = "cipherpool:upload:"  # + uuid; a body being streamed in, with a TTL
STAGED_PREFIX = "cipherpool:staged:"  # + account id + ":" + sha256; deploy artifacts, with a TTL
QUERY_OWNER_PREFIX = "cipherpool:query:"  # + query id -> the token id that submitted it, TTL
RATE_PREFIX = "cipherpool:rate:"  # + principal + ":" + window; request counters, TTL 2 windows
AUTH_FAILURE_PREFIX = "cipherpool:auth-fail:"  # + source address + ":" + window; failed authentications, TTL 2 windows
USAGE_PREFIX = "cipherpool:usage:"  # + token id -> hash {n: queries counted, last: epoch seconds}
KEY_USE_KEY = "cipherpool:key-use"  # hash {"<token id>:<key id>": epoch seconds of its last use}, flushed by beat
AUTH_GENERATION_KEY = "cipherpool:auth-generation"  # bumped on every credential change: gateways drop caches
SERVING_GENERATION_KEY = "cipherpool:serving-generation"  # bumped when which models have a worker up changes
WORKER_LOG_PREFIX = "cipherpool:worker-log:"  # + worker id: a capped list of its log lines (JSON), with a TTL
SHARED_EXECUTION_PREFIX = "cipherpool:shared-exec:"  # + account id -> hash {model:seconds, model:queries} on shared nodes
SHARED_BUCKET_PREFIX = "cipherpool:shared-min:"  # + account id + ":" + minute -> {model:profile:ms, ...:queries}, 7 d
SHARED_LOADED_PREFIX = "cipherpool:shared-loaded:"  # + node name -> hash {"<model id>:<version>": bytes} it holds
SHARED_PENDING_KEY = "cipherpool:shared-min:pending"  # set of "<account>:<minute>" not yet charged
QUERY_COUNT_PREFIX = "cipherpool:queries:"  # + account id + ":" + YYYY-MM-DD -> {model:worker: queries}, 400 d
TIMINGS_PREFIX = "cipherpool:qt:"  # + model id + ":" + (minute | "all" | "recent" | "hist"): query times, see monitoring.timings
REFUSALS_PREFIX = "cipherpool:refusals:"  # + "all" | "a:" account id | "pending:"/"event:" model id: monitoring.refusals
ROLLOUT_LOCK_PREFIX = "cipherpool:rollout:"  # + model id: one node at a time loads a new version
INFLIGHT_PREFIX = "cipherpool:inflight:"  # + query id -> hash {message, missing, sent}: a published query not yet started
AFFINITY_QUEUES_KEY = "cipherpool:affinity-queues"  # hash {affinity queue: last time a node was seen consuming it}
INFLIGHT_INDEX_KEY = "cipherpool:inflight"  # sorted set {query id: publish time}: cipherpool.inflight
RESULT_META_PREFIX = "celery-task-meta-"  # Celery's result key (and pub/sub channel) + task id
# The platform's own health (cipherpool.monitoring.components): `cipherpool status`, /metrics, the watchdog.
PROCESS_BEAT_PREFIX = "cipherpool:platform:alive:"  # + role (gateway, control, beat) -> hash {instance: JSON heartbeat}
BEAT_JOBS_KEY = "cipherpool:platform:beat-jobs"  # hash {task name: unix time its last run finished}
COMPONENT_STATE_PREFIX = "cipherpool:platform:state:"  # + component -> its state as a watchdog last recorded it
PLATFORM_EVENTS_KEY = "cipherpool:platform:events"  # list of JSON events, newest first, capped
WATCHDOG_LEASE_KEY = "cipherpool:platform:watchdog-lease"  # -> the gateway whose watchdog judges now
PLATFORM_EVENT_ID_KEY = "cipherpool:platform:event-id"  # counter: each platform event's id


def node_queue(node_name: str) -> str:
    return f"{NODE_QUEUE_PREFIX}{node_name}"


def query_routing_key(host_class: str, model_id: str) -> str:
    """The routing key of a model's queries: its host class and id. A node binds its model's
    queue under its *own* class, so a node of another class never receives them."""
    return f"{host_class}.{model_id}"


def model_queue(host_class: str, model_id: str) -> str:
    return f"{MODEL_QUEUE_PREFIX}{host_class}.{model_id}"


def affinity_routing_key(host_class: str, model_id: str, node_name: str) -> str:
    """The routing key of the queries of a model sent to one node for their key set
    (:mod:`cipherpool.affinity`): the model's own key, ``@`` and the node's name."""
    return f"{query_routing_key(host_class, model_id)}@{node_name}"


def affinity_queue(host_class: str, model_id: str, node_name: str) -> str:
    return f"{AFFINITY_QUEUE_PREFIX}{affinity_routing_key(host_class, model_id, node_name)}"


def model_queue_of_affinity(queue: str) -> tuple[str, str] | None:
    """The model's own queue and routing key behind an affinity queue's name (None: not an
    affinity queue): where its queries go when its node no longer takes them. A routing key
    holds no ``@`` (host classes and model ids are names and hex), a node name may."""
    if not queue.startswith(AFFINITY_QUEUE_PREFIX):
        return None
    routing_key, at, node = queue[len(AFFINITY_QUEUE_PREFIX) :].partition("@")
    if not at or not routing_key or not node:
        return None
    return f"{MODEL_QUEUE_PREFIX}{routing_key}", routing_key


def shared_routing_key(host_class: str) -> str:
    return f"shared.{host_class}"


def shared_queue(host_class: str) -> str:
    return f"{SHARED_QUEUE_PREFIX}{host_class}"


# Opaque ids shown for rows an integer sequence numbers platform-wide (model events, ledger
# lines, alert events): a prefix per kind, then 16 random hex digits. The sequence stays the
# rows' order inside the platform; its gaps would count other accounts' rows.
EVENT_ID_PREFIX = "ev_"
LEDGER_ID_PREFIX = "ln_"
ALERT_EVENT_ID_PREFIX = "al_"
