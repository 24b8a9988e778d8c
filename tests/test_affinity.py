"""Key affinity's placement (rendezvous hashing) and routing with fallback (issue 27)."""

from __future__ import annotations

from collections import Counter

import pytest

from cipherpool.affinity import ANY, Choice, Router, preferred, ranked, replicas_for, weight

KEYS = [f"key-{i}" for i in range(4000)]
NODES = [f"pool-{i}" for i in range(8)]


def placement(nodes: list[str]) -> dict[str, str]:
    return {key: preferred(key, nodes)[0] for key in KEYS}


def test_weight_is_stable_and_the_order_does_not_depend_on_the_list_order() -> None:
    assert weight("k", "pool-1") == weight("k", "pool-1")
    assert ranked("k", NODES) == ranked("k", list(reversed(NODES)))
    assert sorted(ranked("k", NODES)) == sorted(NODES)
    assert preferred("k", NODES, 3) == ranked("k", NODES)[:3]
    assert preferred("k", [], 1) == []


def test_key_sets_spread_evenly_over_the_nodes() -> None:
    counts = Counter(placement(NODES).values())
    share = len(KEYS) / len(NODES)
    assert set(counts) == set(NODES)
    assert all(abs(n - share) < 0.2 * share for n in counts.values()), counts


def test_a_node_leaving_moves_only_its_own_key_sets() -> None:
    before = placement(NODES)
    after = placement(NODES[:-1])
    moved = {key for key in KEYS if before[key] != after[key]}
    assert moved == {key for key in KEYS if before[key] == NODES[-1]}  # only the leaver's
    assert len(moved) == pytest.approx(len(KEYS) / len(NODES), rel=0.2)


def test_a_node_joining_takes_about_one_nth_and_only_from_others() -> None:
    before = placement(NODES)
    after = placement([*NODES, "pool-new"])
    moved = [key for key in KEYS if before[key] != after[key]]
    assert all(after[key] == "pool-new" for key in moved)  # nothing moves between old nodes
    assert len(moved) == pytest.approx(len(KEYS) / (len(NODES) + 1), rel=0.2)


def test_the_router_sends_a_key_set_to_its_preferred_node_while_it_has_room() -> None:
    router = Router(bound=2)
    first = router.choose("k", NODES)
    assert first == Choice(ranked("k", NODES)[0], False)
    assert router.choose("k", NODES) == first
    assert router.outstanding(first.node or "") == 2
    assert router.fallbacks == 0


def test_past_the_bound_it_falls_back_to_the_next_node_then_to_any_worker() -> None:
    router = Router(bound=1, tries=2)
    order = ranked("k", NODES)
    assert router.choose("k", NODES) == Choice(order[0], False)
    assert router.choose("k", NODES) == Choice(order[1], True)  # the preferred one is busy
    assert router.choose("k", NODES) == Choice(ANY, True)  # both busy: the model's shared queue
    assert router.fallbacks == 2 and router.routed == 3
    router.done(Choice(order[0], False))
    assert router.outstanding(order[0]) == 0
    assert router.choose("k", NODES) == Choice(order[0], False)  # room again: back home


def test_no_node_up_goes_to_the_shared_queue_without_a_fallback() -> None:
    router = Router(bound=1)
    assert router.choose("k", []) == Choice(ANY, False)
    assert router.fallbacks == 0
    router.done(Choice(ANY, False))  # nothing was counted: nothing to give back


def test_a_bound_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        Router(bound=0)


def test_replicas_follow_the_room_in_the_nodes_caches() -> None:
    assert replicas_for(16, 2, 2) == 16  # few key sets: every node may take each of them
    assert replicas_for(16, 2, 8) == 4
    assert replicas_for(16, 2, 64) == 1  # more key sets than the caches hold: one home each
    assert replicas_for(4, 2, 0) == 4 and replicas_for(0, 2, 5) == 1


def test_a_key_set_with_several_homes_goes_to_the_least_busy_of_them() -> None:
    router = Router(bound=5)
    order = ranked("k", NODES)
    picks = [router.choose("k", NODES, replicas=3).node for _ in range(6)]
    assert picks == order[:3] * 2  # least busy first, ties to the higher ranked
    assert set(picks) <= set(order[:3]) and router.fallbacks == 0
    assert router.choose("k", NODES[:2], replicas=9).node in NODES[:2]  # never more homes than nodes


def test_a_routed_query_is_held_until_released_or_its_hold_passes() -> None:
    now = [100.0]
    router = Router(bound=1, hold_s=30.0, clock=lambda: now[0])
    order = ranked("k", NODES)
    assert router.route("q1", "k", NODES).node == order[0]
    assert router.route("q2", "k", NODES).node == order[1]  # q1 holds the home
    router.release("q1")
    router.release("q1")  # twice (two polls read the answer): given back once
    assert router.outstanding(order[0]) == 0 and router.held() == 1
    assert router.route("q3", "k", NODES).node == order[0]
    now[0] += 31.0  # neither answer was heard here (the client polled another gateway)
    assert router.route("q4", "k", NODES).node == order[0]  # the sweep gave both back first
    assert router.held() == 1 and router.outstanding(order[1]) == 0
    router.release("never-routed")  # a query this router never routed: nothing happens


def test_the_bound_is_per_execution_slot() -> None:
    router = Router(bound=1)
    order = ranked("k", NODES)
    capacity = {order[0]: 3}
    picks = [router.route(f"q{i}", "k", NODES, capacity=capacity).node for i in range(4)]
    assert picks == [order[0]] * 3 + [order[1]]  # three slots at home, then the next node
    assert router.fallbacks == 1 and router.to_any == 0


def test_the_router_counts_a_models_key_sets_active_within_the_window() -> None:
    now = [0.0]
    router = Router(bound=1, clock=lambda: now[0])
    assert [router.active("m", k, window_s=60) for k in ("a", "b", "a")] == [1, 2, 2]
    assert router.active("other", "a", window_s=60) == 1  # per model
    now[0] = 61.0
    assert router.active("m", "c", window_s=60) == 1  # a and b went quiet
    for i in range(100):  # many key sets: swept as they go, never kept past the window
        now[0] += 61.0
        assert router.active("m", f"k{i}", window_s=60) == 1
    assert len(router._seen["m"]) <= 16


def test_assign_spreads_a_few_key_sets_evenly_and_the_same_way_everywhere() -> None:
    from cipherpool.affinity import assign

    nodes = NODES[:4]
    keys = [f"ks-{i}" for i in range(8)]
    placed = assign(keys, nodes)
    assert Counter(h[0] for h in placed.values()) == Counter({n: 2 for n in nodes})  # bounded: 2 each, not 4/3/1/0
    assert assign(list(reversed(keys)), list(reversed(nodes))) == placed  # every gateway computes the same
    two = assign(keys[:2], nodes, homes=2)
    assert sorted(n for h in two.values() for n in h) == sorted(nodes)  # two key sets, two homes each: every node used
    assert assign(keys, []) == {k: [] for k in keys}


def test_the_router_routes_a_scopes_key_sets_to_their_assigned_homes() -> None:
    from cipherpool.affinity import assign

    router = Router(bound=5)
    nodes = NODES[:4]
    keys = [f"ks-{i}" for i in range(8)]
    for k in keys:
        router.active("m", k)
    placed = assign(keys, nodes)
    for i, k in enumerate(keys):
        assert router.route(f"q{i}", k, nodes, scope="m").node == placed[k][0]
    assert router.homes_of("m", keys[0], nodes) == placed[keys[0]]
