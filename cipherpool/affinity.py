"""Key affinity: which of a model's nodes a key set's queries should go to (issue 27).

A node keeps an LRU of *deserialized* evaluation keys (:mod:`cipherpool.fhe.keycache`); a key
set whose queries land on any of the model's nodes at random is deserialized on each of them
in turn, and with more active key sets than one node's cache holds most queries miss. Sent to
one node per key set, each node only holds its share of the key sets.

**Placement: rendezvous hashing** (highest random weight). A key set's preferred node is the
one whose ``hash(key set, node)`` is highest among the model's up nodes. Adding or removing a
node moves only the key sets that node wins or held (about ``1/n`` of them), and the spread is
even without a ring or virtual nodes; :func:`ranked` gives the next choices in order.

**Homes** (:func:`replicas_for`): a key set may use its first few nodes in rank, as many as
the nodes' caches have room for among the active key sets, so a few busy key sets still spread
over every node. **Fallback** (:class:`Router`): the least busy home takes the query; one with
``bound`` of this router's queries outstanding is passed over for the next node in rank, and
then the model's shared queue (any worker), so no query waits behind a hot spot.
Outstanding queries are counted in memory by whoever routes (a gateway), so the check costs no
round trip; each fallback is counted (:attr:`Router.fallbacks`).

This module decides; it does not publish. The gateway routes each query with
:meth:`Router.route` and gives it back with :meth:`Router.release` when it hears the answer
(a query whose answer it never hears is given back after ``hold_s``); the queues, and what
keeps a query from being stranded in one, are :mod:`cipherpool.affinity_queues`.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

ANY = None  # a routing decision for no node in particular: the model's shared queue


def weight(key_id: str, node: str) -> int:
    """The pair's rendezvous weight: stable across processes and restarts (not Python's
    salted ``hash``), 64 bits of BLAKE2b."""
    digest = hashlib.blake2b(f"{key_id}\x00{node}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def ranked(key_id: str, nodes: Iterable[str]) -> list[str]:
    """The nodes in the key set's order of preference (highest weight first; ties by name)."""
    return sorted(set(nodes), key=lambda node: (-weight(key_id, node), node))


def preferred(key_id: str, nodes: Iterable[str], count: int = 1) -> list[str]:
    """The key set's ``count`` preferred nodes (fewer when fewer are up)."""
    return ranked(key_id, nodes)[: max(0, count)]


def replicas_for(nodes: int, keys_per_node: float, active_key_sets: int) -> int:
    """How many nodes each key set may use: the nodes' caches together hold ``nodes x
    keys_per_node`` keys; shared among ``active_key_sets``, each gets that many homes (at
    least 1, at most every node). With few key sets each is on every node (no cache pressure,
    no hot spot); with more key sets than the caches hold, each has one home."""
    if nodes <= 0:
        return 1
    if active_key_sets <= 0:
        return nodes
    return max(1, min(nodes, int(nodes * keys_per_node // active_key_sets)))


def assign(key_ids: Iterable[str], nodes: Sequence[str], homes: int = 1) -> dict[str, list[str]]:
    """Each key set's homes among ``nodes``: its first ``homes`` nodes in rank that have room,
    no node taking more than ``ceil(key sets x homes / nodes)`` (consistent hashing with bounded
    loads). Rendezvous ranks alone spread a few key sets unevenly (measured on 4 nodes: 8 key
    sets fell 4/3/1/0, and the node with 4 thrashed its cache); bounded, they fall 2/2/2/2. Key
    sets are taken in order of id, so every gateway that sees the same key sets computes the same
    homes; one key set more or less moves only the few whose nodes filled up."""
    keys, up = sorted(set(key_ids)), sorted(set(nodes))
    if not up:
        return {k: [] for k in keys}
    homes = max(1, min(homes, len(up)))
    cap = max(1, -(-len(keys) * homes // len(up)))
    load: Counter[str] = Counter()
    placed: dict[str, list[str]] = {}
    for key in keys:
        chosen = []
        for node in ranked(key, up):
            if load[node] < cap:
                chosen.append(node)
                load[node] += 1
                if len(chosen) == homes:
                    break
        placed[key] = chosen
    return placed


@dataclass(frozen=True)
class Choice:
    """Where a query goes: ``node`` (None: the model's shared queue) and whether that is a
    fallback (a node outside the key set's homes, or the shared queue)."""

    node: str | None
    fallback: bool


class Router:
    """One router's (a gateway's) routing decisions and its count of outstanding queries per
    node. Thread-safe: a gateway routes from its request threads.

    ``bound`` is per execution slot: a node of ``slots`` slots (``capacity``) is passed over
    once ``bound x slots`` of this router's queries are outstanding there."""

    def __init__(self, bound: int, tries: int = 2, hold_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        if bound < 1:
            raise ValueError("an affinity bound is at least 1 outstanding query")
        self.bound = bound  # outstanding queries per slot past which a node is passed over
        self.tries = max(1, tries)  # how many nodes in rank order are tried before the shared queue
        self.hold_s = hold_s  # a routed query whose answer this router never hears counts this long
        self._clock = clock
        self._outstanding: Counter[str] = Counter()
        self._held: dict[str, tuple[str, float]] = {}  # query id -> (node, counted until)
        self._next_sweep = 0.0
        self._seen: dict[str, dict[str, float]] = {}  # scope -> key set -> when last seen (:meth:`active`)
        self._active: dict[str, tuple[float, frozenset[str]]] = {}  # scope -> (when taken, its active key sets)
        # scope -> (key sets, nodes, replicas, assign()'s homes for them)
        self._placed: dict[str, tuple[frozenset[str], tuple[str, ...], int, dict[str, list[str]]]] = {}
        self._lock = threading.Lock()
        self.routed = 0  # decisions taken
        self.fallbacks = 0  # of which: outside the key set's homes (the next node, or any worker)
        self.to_any = 0  # of which: the model's shared queue

    def choose(
        self,
        key_id: str,
        nodes: Sequence[str],
        replicas: int = 1,
        capacity: Mapping[str, int] | None = None,
        homes: Sequence[str] | None = None,
    ) -> Choice:
        """The node for a query of ``key_id`` among ``nodes`` (the model's up nodes), counted
        as outstanding there until :meth:`done`.

        The key set's ``replicas`` first nodes in rank are its home (:func:`replicas_for`: as
        many as the nodes' caches have room for, so a few busy key sets spread over every
        node): the least busy of them takes it (ties: the higher ranked). When that one has
        its bound of queries outstanding, the next ``tries - 1`` nodes in rank are tried, then
        the model's shared queue (a fallback, counted). No node up: the shared queue, no
        fallback. ``homes``: the key set's homes as :func:`assign` placed them (then the other
        nodes in rank), instead of its first ``replicas`` in rank."""
        if not nodes:
            return Choice(ANY, False)
        order = ranked(key_id, nodes)
        if homes:
            order = [n for n in homes if n in order] + [n for n in order if n not in homes]
            replicas = len(homes)
        home = max(1, min(replicas, len(order)))
        slots = capacity or {}

        def full(node: str) -> bool:
            return self._outstanding[node] >= self.bound * max(1, slots.get(node, 1))

        with self._lock:
            self.routed += 1
            _load, place = min(
                (self._outstanding[node] / max(1, slots.get(node, 1)), place) for place, node in enumerate(order[:home])
            )
            if full(order[place]):
                place = next((p for p in range(home, min(len(order), home + self.tries - 1)) if not full(order[p])), -1)
            if place < 0:
                self.fallbacks += 1
                self.to_any += 1
                return Choice(ANY, True)
            node = order[place]
            self._outstanding[node] += 1
            spilled = place >= home
            self.fallbacks += spilled
            return Choice(node, spilled)

    def done(self, choice: Choice) -> None:
        """The query routed by ``choice`` was answered, failed or was never sent."""
        if choice.node is None:
            return
        with self._lock:
            self._give_back(choice.node)

    def route(
        self,
        query_id: str,
        key_id: str,
        nodes: Sequence[str],
        replicas: int = 1,
        capacity: Mapping[str, int] | None = None,
        scope: str | None = None,
    ) -> Choice:
        """:meth:`choose`, the query held by its id until :meth:`release` (or ``hold_s``).
        ``scope`` (a model): its homes are placed among the scope's active key sets
        (:meth:`homes_of`), not by rank alone."""
        self._sweep()
        homes = self.homes_of(scope, key_id, nodes, replicas) if scope is not None else None
        choice = self.choose(key_id, nodes, replicas, capacity, homes)
        if choice.node is not None:
            with self._lock:
                self._held[query_id] = (choice.node, self._clock() + self.hold_s)
        return choice

    def release(self, query_id: str) -> None:
        """The query's answer arrived (or it was never sent): its node has room again. Idempotent."""
        with self._lock:
            held = self._held.pop(query_id, None)
            if held is not None:
                self._give_back(held[0])

    def held(self) -> int:
        with self._lock:
            return len(self._held)

    def homes_of(self, scope: str, key_id: str, nodes: Sequence[str], replicas: int = 1, window_s: float = 60.0) -> list[str]:
        """``key_id``'s homes, :func:`assign` over the scope's active key sets (:meth:`active`,
        and this one), recomputed only when those, the nodes or ``replicas`` change: most
        queries cost a dictionary lookup."""
        with self._lock:
            keys = self._snapshot(scope, window_s)
            if key_id not in keys:
                keys = keys | {key_id}
            nodes_now = tuple(nodes)
            cached = self._placed.get(scope)
            if cached is None or cached[0] is not keys or cached[1] != nodes_now or cached[2] != replicas:
                cached = (keys, nodes_now, replicas, assign(keys, nodes_now, replicas))
                self._placed[scope] = cached
            return list(cached[3].get(key_id, []))

    def active(self, scope: str, key_id: str, window_s: float = 60.0) -> int:
        """Note a query of ``key_id`` in ``scope`` (a model) and say how many key sets of it
        this router saw within ``window_s``: what :func:`replicas_for` shares the caches among.
        The count is taken again when a key set is new and at most once a second otherwise
        (one that went quiet leaves it within a second of its window), pruning as it goes."""
        now = self._clock()
        with self._lock:
            self._seen.setdefault(scope, {})[key_id] = now
            return len(self._snapshot(scope, window_s, now, new=key_id))

    def _snapshot(self, scope: str, window_s: float, now: float | None = None, new: str | None = None) -> frozenset[str]:
        """The scope's active key sets, as last taken (under the lock)."""
        now = self._clock() if now is None else now
        taken = self._active.get(scope)
        if taken is None or now - taken[0] >= 1.0 or (new is not None and new not in taken[1]):
            seen = self._seen.get(scope, {})
            for old in [k for k, t in seen.items() if now - t > window_s]:
                del seen[old]
            taken = (now, frozenset(seen))
            self._active[scope] = taken
        return taken[1]

    def _sweep(self) -> None:
        """Give back the queries held past ``hold_s`` (answered where this router never heard:
        a client that polled another gateway, or gave up). At most once a second."""
        now = self._clock()
        if now < self._next_sweep:
            return
        with self._lock:
            self._next_sweep = now + 1.0
            for query_id in [q for q, (_, until) in self._held.items() if until <= now]:
                self._give_back(self._held.pop(query_id)[0])

    def _give_back(self, node: str) -> None:
        left = self._outstanding[node] - 1
        if left > 0:
            self._outstanding[node] = left
        else:
            del self._outstanding[node]

    def outstanding(self, node: str) -> int:
        with self._lock:
            return self._outstanding[node]
