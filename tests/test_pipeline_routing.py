"""Routes of microbatches through the stages, and the choice of replica by measured speed."""

from __future__ import annotations

import pytest

from swarm.pipeline.routing import Router, check_route, route


def test_an_in_order_route_visits_every_stage_once() -> None:
    assert route(3, 0, False) == [(0, "eb"), (1, "b"), (2, "bh")]
    assert route(3, 1, False) == route(3, 0, False)
    assert route(1, 0, False) == [(0, "ebh")]


def test_odd_microbatches_swap_the_end_pairs_under_the_out_of_order_schedule() -> None:
    assert route(4, 0, True) == [(0, "eb"), (1, "b"), (2, "b"), (3, "bh")]
    # Stage 0 embeds, stage 1 runs its blocks first; stage 3's blocks run before stage 2's, and 3 the head.
    assert route(4, 1, True) == [(0, "e"), (1, "b"), (0, "b"), (3, "b"), (2, "b"), (3, "h")]
    assert route(2, 1, True) == [(0, "e"), (1, "b"), (0, "b"), (1, "h")]
    for mb in range(4):
        assert check_route([list(h) for h in route(6, mb, True)], 6) == route(6, mb, True)


@pytest.mark.parametrize("bad, word", [
    ([], "non-empty"),
    ("route", "non-empty"),
    ([[0, "eb"], [5, "bh"]], "outside"),
    ([[0, "be"], [1, "bh"]], "ordered subset"),
    ([[0, "ebx"], [1, "bh"]], "ordered subset"),
    ([[0, ""], [1, "bh"]], "ordered subset"),
    ([[0, "b"], [1, "bh"]], "embedding"),
    ([[0, "eb"], [1, "e"], [1, "bh"]], "embedding"),
    ([[0, "ebh"], [1, "bh"]], "head"),
    ([[0, "eb"], [1, "b"]], "head"),
    ([[True, "eb"], [1, "bh"]], "stage, ops"),
    ([[0, "eb", 1], [1, "bh"]], "stage, ops"),
    ([[0, "eb"]] * 20, "at most"),
])
def test_a_malformed_route_from_another_peer_is_refused(bad: object, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        check_route(bad, 3)


def test_the_router_prefers_the_replica_expected_to_finish_first() -> None:
    router = Router("me", cooldown_s=5.0)
    router.update({1: {"fast": "a:1", "slow": "b:1", "me": "c:1"}, 2: {"x": "d:1"}})
    assert router.replicas(1) == ["fast", "slow"]  # never itself
    router.finished("fast", 0.1, now=0.0)
    router.finished("slow", 1.0, now=0.0)
    assert router.choose(1, now=0.0) == ("fast", "a:1")
    # Busy enough that waiting for it takes longer than the slow one: 10 in flight x 0.1 s > 1 x 1.0 s.
    for _ in range(10):
        router.started("fast")
    assert router.choose(1, now=0.0) == ("slow", "b:1")


def test_an_unmeasured_replica_is_tried_and_a_failed_one_rests() -> None:
    router = Router("me", cooldown_s=5.0)
    router.update({1: {"old": "a:1"}})
    router.finished("old", 0.5, now=0.0)
    router.update({1: {"old": "a:1", "new": "b:1"}})  # a joiner: counted as fast as the fastest known
    assert router.choose(1, now=0.0) == ("new", "b:1")
    router.started("new")
    router.finished("new", None, now=10.0)  # its call failed
    assert router.choose(1, now=12.0) == ("old", "a:1")
    assert router.choose(1, now=12.0, exclude=frozenset({"old"})) is None
    assert router.choose(1, now=15.5) is not None  # back after the cooldown
    assert router.choose(3, now=0.0) is None


def test_a_replica_that_moved_address_starts_unmeasured() -> None:
    router = Router("me")
    router.update({1: {"p": "a:1"}})
    router.finished("p", 3.0, now=0.0)
    router.update({1: {"p": "a:2", "q": "b:1"}})
    router.finished("q", 1.0, now=0.0)
    # p restarted elsewhere: its old 3 s no longer counts, so it is as good as the best known.
    assert router.choose(1, now=0.0) == ("p", "a:2")
    assert router.address("q") == "b:1" and router.address("zz") is None
