"""The end-user flow of scripts/compose_check.sh, run in a client container on the compose
network: it talks to the gateway over HTTP and to nothing else, as a provider and an end user
would. State between the steps (the provider's key, the token, the end user's key directory,
the inputs and the clear model's answers) lives in /state, a folder of the check's own.

    flow.py serve            provider: train and compile a small model, deploy, activate, start a
                             worker, create a token; end user: keys, upload, predict; FHE == clear
    flow.py serving NODE SINCE [TIMEOUT_S] [--node-down]
                             after NODE was killed at SINCE (UTC, ISO 8601): wait until NODE is
                             back under its name and the worker is rebound or replaced
                             (--node-down: NODE stays down; its worker replaced elsewhere)
    flow.py online NODE      wait until NODE is online again
    flow.py predict          end user: predict again with the same keys; FHE == clear
    flow.py cleanup          provider: stop the workers, delete the model

Each step prints one JSON line last (what the shell script reads) and exits 1 on a mismatch.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cipherpool.client import ManagementClient, QueryClient

STATE = Path(os.environ.get("CHECK_STATE", "/state"))
URL = os.environ.get("CIPHERPOOL_URL", "http://gateway:8080")
MODEL = "compose-check"
INPUTS = 3
TOLERANCE = 1e-3  # probabilities: FHE and clear agree within this (and on the class)


def say(message: str) -> None:
    print(f"  [client] {message}", flush=True)


def provider() -> ManagementClient:
    return ManagementClient(api_key=(STATE / "api_key").read_text().strip(), url=URL)


def end_user() -> QueryClient:
    token = json.loads((STATE / "state.json").read_text())["token"]
    return QueryClient(token, url=URL, key_dir=STATE / "keys")


def check(qc: QueryClient) -> dict[str, Any]:
    """Predict the saved inputs in FHE and compare with the clear model's saved answers."""
    x, clear = np.load(STATE / "x.npy"), np.load(STATE / "clear.npy")
    started = time.monotonic()
    fhe = np.asarray(qc.predict(x))
    elapsed = time.monotonic() - started
    worst = float(np.abs(fhe - clear).max())
    same_class = bool((fhe.argmax(axis=1) == clear.argmax(axis=1)).all())
    for i in range(len(x)):
        say(f"input {i}: FHE {np.round(fhe[i], 4).tolist()} | clear {np.round(clear[i], 4).tolist()}")
    ok = same_class and worst <= TOLERANCE
    say(f"{len(x)} encrypted predictions in {elapsed:.2f} s; max |FHE - clear| = {worst:.2e} ({'agree' if ok else 'DISAGREE'})")
    return {"ok": ok, "predict_s": round(elapsed, 3), "max_abs_diff": worst}


def serve() -> dict[str, Any]:
    from cipherpool.examples import train_breast_cancer

    mc = provider()
    t = time.monotonic()
    example = train_breast_cancer(STATE / "model")
    say(f"trained and compiled a logistic regression (breast cancer, 8 bits) in {time.monotonic() - t:.1f} s")
    t = time.monotonic()
    mc.deploy_model(MODEL, example.path, description="scripts/compose_check.sh")
    mc.activate_model(MODEL)
    worker = mc.start_worker(MODEL)
    say(f"deployed and activated {MODEL!r}; worker {worker.id} up on {worker.node} after {time.monotonic() - t:.1f} s")
    token = mc.create_token("compose-check-user", model=MODEL)
    x = example.x_test[:INPUTS]
    np.save(STATE / "x.npy", x)
    np.save(STATE / "clear.npy", example.clear(x))
    fd = os.open(STATE / "state.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"token": token, "worker": worker.id, "node": worker.node}, out)
    with end_user() as qc:
        t = time.monotonic()
        qc.generate_keys()
        key_id = qc.upload_evaluation_keys()
        say(f"end user: keys generated, evaluation key {key_id[:12]}... uploaded in {time.monotonic() - t:.1f} s")
        result = check(qc)
    return {**result, "worker": worker.id, "node": worker.node}


def serving(killed: str, since: str, timeout_s: float, node_down: bool = False) -> dict[str, Any]:
    """Wait until the model serves again after node KILLED was killed at SINCE: the node back
    online under the same name and either its worker rebound (the node restarted holding it:
    a worker_downtime event, then the worker up again) or, past the loss window, the worker
    failed and the reconciler's replacement up (on any node). ``node_down``: the node stays
    down, so only a replacement on another node will do."""
    mc = provider()
    before = json.loads((STATE / "state.json").read_text())["worker"]
    after = datetime.fromisoformat(since).replace(tzinfo=timezone.utc)
    deadline = time.monotonic() + timeout_s
    printed: set[str] = set()
    seen = ""
    while True:
        events = mc.model_events(MODEL, since=after)
        for event in events:
            if event.id not in printed:
                printed.add(event.id)
                say(f"event {event.at[11:19]} {event.kind}: {event.message}")
        kinds = {(e.kind, e.worker_id) for e in events}
        nodes = {n.name: n.status for n in mc.list_nodes()}
        up = [w for w in mc.list_workers(MODEL) if w.status == "up"]
        line = f"{killed}: {nodes.get(killed, 'absent')}; up: {', '.join(f'{w.id} on {w.node}' for w in up) or 'none'}"
        if line != seen:
            say(line)
            seen = line
        back = nodes.get(killed) == "online" or node_down
        rebound = ("worker_downtime", before) in kinds and any(w.id == before for w in up)
        replaced = ("worker_failed", before) in kinds and any(("worker_up", w.id) in kinds for w in up if w.id != before)
        if back and (rebound or replaced) and not (node_down and rebound):
            worker = next(w for w in up if (w.id == before) == rebound)
            how = "rebound: the same worker, its node restarted holding it" if rebound else f"replaced: {before} failed, {worker.id} started by the reconciler"
            return {"ok": True, "node": killed, "node_status": nodes.get(killed), "worker": worker.id, "on": worker.node, "how": how}
        if time.monotonic() > deadline:
            return {"ok": False, "why": f"not serving again within {timeout_s:g} s: {line}"}
        time.sleep(1)


def online(node: str, timeout_s: float) -> dict[str, Any]:
    """Wait until NODE is online again (after an outage that cost it its worker)."""
    mc = provider()
    deadline = time.monotonic() + timeout_s
    while True:
        found = {n.name: n for n in mc.list_nodes()}.get(node)
        if found is not None and found.status == "online":
            say(f"{node}: online again, {'holding worker ' + str(found.worker_id) if found.worker_id else 'free'}")
            return {"ok": True, "node": node, "worker": found.worker_id}
        if time.monotonic() > deadline:
            return {"ok": False, "why": f"{node} not online within {timeout_s:g} s ({found.status if found else 'absent'})"}
        time.sleep(1)


def predict() -> dict[str, Any]:
    with end_user() as qc:
        qc.generate_keys()  # reloaded from the key directory: the same keys, already uploaded
        return check(qc)


def cleanup() -> dict[str, Any]:
    mc = provider()
    for worker in mc.list_workers(MODEL):
        if worker.status not in ("stopped", "failed"):
            mc.stop_worker(worker.id)
    mc.delete_model(MODEL)
    return {"ok": True}


def main() -> None:
    step = sys.argv[1] if len(sys.argv) > 1 else ""
    if step == "serve":
        result = serve()
    elif step == "serving":
        args = [a for a in sys.argv[2:] if a != "--node-down"]
        result = serving(args[0], args[1], float(args[2]) if len(args) > 2 else 300.0, "--node-down" in sys.argv)
    elif step == "online":
        result = online(sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 120.0)
    elif step == "predict":
        result = predict()
    elif step == "cleanup":
        result = cleanup()
    else:
        sys.exit(__doc__)
    print(json.dumps(result), flush=True)
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
