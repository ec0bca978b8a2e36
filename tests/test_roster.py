"""Member lists sent as changes: rebuilt exactly, checked by digest, whole whenever anything does not match."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from swarm.coordinator.roster import Roster, RosterMismatch, Rosters, digest
from swarm.proto.v1 import coordinator_pb2 as pb


def _member(i: int, port: int = 9000) -> pb.Member:
    return pb.Member(peer_id=f"p{i:05d}", address=f"10.0.{i // 250}.{i % 250}:{port}",
                     capabilities=pb.Capabilities(device="cuda", bandwidth_bytes_per_s=1e8 + i))


def _started(members: list[pb.Member], rosters: Rosters, number: int = 1) -> pb.RendezvousReply:
    attempt = pb.Attempt(number=number, members=members, deadline_in_s=60.0, roster=rosters.remember(members))
    return pb.RendezvousReply(outcome=pb.RendezvousReply.STARTED, attempt=attempt, next_round=1)


def _ids(attempt: pb.Attempt) -> list[str]:
    return [m.peer_id for m in attempt.members]


def test_a_list_sent_as_changes_is_rebuilt_exactly_and_is_a_fraction_of_the_whole() -> None:
    rosters, peer = Rosters(), Roster()
    first = [_member(i) for i in range(1000)]
    reply = rosters.for_caller(_started(first, rosters), "")  # knows no list: the whole one
    assert len(reply.attempt.members) == 1000 and not reply.attempt.base_roster
    peer.adopt(reply.attempt)
    assert peer.digest == digest(first)

    # Next round: p00003 left, p01000 joined, p00007 moved to another port.
    second = [m for m in first if m.peer_id != "p00003"] + [_member(1000)]
    second[6] = _member(7, port=9100)
    whole = _started(second, rosters)
    delta = rosters.for_caller(whole, peer.digest)
    assert delta.attempt.base_roster == digest(first)
    assert sorted(_ids(delta.attempt)) == ["p00007", "p01000"] and list(delta.attempt.removed) == ["p00003"]
    assert delta.ByteSize() < whole.ByteSize() / 100
    assert rosters.for_caller(whole, peer.digest) is delta  # built once per attempt and base, not per caller

    peer.adopt(delta.attempt)
    assert [m.SerializeToString() for m in delta.attempt.members] == [m.SerializeToString() for m in second]
    assert not delta.attempt.base_roster and not delta.attempt.removed
    assert peer.digest == whole.attempt.roster
    same = rosters.for_caller(whole, peer.digest)  # the same list again: no member sent
    assert len(same.attempt.members) == 0 and same.attempt.base_roster == peer.digest
    peer.adopt(same.attempt)
    assert len(same.attempt.members) == len(second)


def test_changes_against_a_list_the_peer_does_not_hold_are_refused_and_change_nothing() -> None:
    rosters = Rosters()
    a, b = [_member(i) for i in range(5)], [_member(i) for i in range(1, 6)]
    _started(a, rosters)
    delta = rosters.for_caller(_started(b, rosters), digest(a)).attempt
    stranger = Roster()
    before = delta.SerializeToString()
    with pytest.raises(RosterMismatch, match="this peer holds none"):
        stranger.adopt(delta)
    assert delta.SerializeToString() == before and stranger.digest == ""


def test_changes_that_do_not_rebuild_the_digest_are_refused() -> None:
    rosters, peer = Rosters(), Roster()
    a = [_member(i) for i in range(5)]
    peer.adopt(rosters.for_caller(_started(a, rosters), "").attempt)
    delta = rosters.for_caller(_started(a[:4] + [_member(9)], rosters), peer.digest).attempt
    delta.members[0].address = "203.0.113.9:1"  # tampered, or a bug on either side
    with pytest.raises(RosterMismatch, match="digest"):
        peer.adopt(delta)
    assert peer.digest == digest(a)
    whole = pb.Attempt(members=a, roster="0" * 32)
    with pytest.raises(RosterMismatch, match="digest"):
        peer.adopt(whole)


def test_an_unknown_base_or_an_unsorted_list_gets_the_whole_list() -> None:
    rosters = Rosters(keep=2)
    lists = [[_member(i + k) for i in range(4)] for k in range(4)]
    replies = [_started(m, rosters) for m in lists]  # only the last two are remembered
    assert rosters.for_caller(replies[3], digest(lists[0])) is replies[3]
    assert rosters.for_caller(replies[3], digest(lists[2])).attempt.base_roster == digest(lists[2])
    unsorted = [_member(2), _member(1)]
    assert rosters.remember(unsorted) == ""
    reply = _started(unsorted, rosters)
    assert rosters.for_caller(reply, digest(lists[3])) is reply


async def test_peers_get_the_changes_over_the_wire_and_rebuild_each_attempt(
        server_factory: Callable, make_client: Callable, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[bool, int]] = []  # (as changes?, members in the reply) of each STARTED reply a client got
    adopt = Roster.adopt

    def spy(self: Roster, attempt: pb.Attempt) -> None:
        sent.append((bool(attempt.base_roster), len(attempt.members)))
        adopt(self, attempt)

    monkeypatch.setattr(Roster, "adopt", spy)
    srv = await server_factory(lease_s=60.0, heartbeat_interval_s=1.0, rendezvous_timeout_s=60.0)
    clients = {p: make_client(srv, p) for p in ("a", "b", "c")}
    for i, c in enumerate(clients.values()):
        await c.join(f"127.0.0.1:{6000 + i}")
    first = await asyncio.gather(*(c.rendezvous(0, 0, wait_s=5.0) for c in clients.values()))
    assert all(_ids(r.attempt) == ["a", "b", "c"] for r in first)
    for c in clients.values():
        await c.commit(0, 0, 1, "ab" * 8, wait_s=5.0)
    d = make_client(srv, "d")
    await d.join("127.0.0.1:6010")
    second = await asyncio.gather(*(c.rendezvous(0, 1, wait_s=5.0) for c in clients.values()),
                                  d.rendezvous(0, 1, wait_s=5.0))
    assert all(r.outcome == pb.RendezvousReply.STARTED for r in second)
    assert all(_ids(r.attempt) == ["a", "b", "c", "d"] for r in second)  # rebuilt from the changes
    assert [m.address for m in second[0].attempt.members] == [f"127.0.0.1:{p}" for p in (6000, 6001, 6002, 6010)]
    assert len({c._roster.digest for c in (*clients.values(), d)}) == 1
    assert sent[:3] == [(False, 3)] * 3  # round 0: nobody held a list
    assert sorted(sent[3:]) == [(False, 4), (True, 1), (True, 1), (True, 1)]  # round 1: d alone is news
