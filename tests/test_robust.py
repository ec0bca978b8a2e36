"""Robust aggregation: the arithmetic (bound, clip, trim, declared norms) and the coordinator's refusals.

The arithmetic is checked against plain numpy references; the coordinator's side through its pure
decisions (a refused member is named, gets MISSED with the reason, and is quarantined after repeats).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from swarm.allreduce.butterfly import Participant, allreduce_attempt
from swarm.allreduce.reduce import encode_result, gathers_payloads, parts_for, reduce_payloads
from swarm.allreduce.robust import Directions, Rule, aggregate, median_norm, out_of_bound, weights
from swarm.compression import CodecConfig, Contribution, ErrorFeedback, make_codec
from swarm.coordinator import views
from swarm.coordinator.config import CoordinatorConfig
from swarm.coordinator.decisions import Arrive
from swarm.coordinator.rounds import quarantined
from swarm.diloco import GlobalState, LocalGroup, OuterConfig
from swarm.transport.endpoint import Endpoint, PeerFailure, TransportConfig
from swarm.transport.faults import FaultInjector
from tests.test_decisions import CFG, RUN, Sim, inc


def test_rules_parse_and_refuse_what_they_do_not_know() -> None:
    assert Rule.parse("") == Rule("mean") and str(Rule.parse("mean")) == "mean"
    assert str(Rule.parse("clipped-mean")) == "clipped-mean"
    assert Rule.parse("trimmed-mean") == Rule("trimmed-mean", 1)
    assert str(Rule.parse("trimmed-mean:2")) == "trimmed-mean:2"
    for bad in ("median", "trimmed-mean:0", "trimmed-mean:x", "clipped-mean:2"):
        with pytest.raises(ValueError, match="aggregate|count|trimmed"):
            Rule.parse(bad)
    with pytest.raises(ValueError, match="aggregate"):
        CoordinatorConfig(aggregate="median")
    with pytest.raises(ValueError, match="norm_bound"):
        CoordinatorConfig(norm_bound=0.5)


def test_the_median_is_the_lower_one_so_a_member_cannot_pull_it_up_alone() -> None:
    assert median_norm([]) == 0.0
    assert median_norm([3.0, 1.0]) == 1.0
    assert median_norm([5.0, 1.0, 2.0, 1000.0]) == 2.0
    refused = out_of_bound({"a": 1.0, "b": 1.2, "c": 0.9, "x": 120.0}, bound=4.0)
    assert list(refused) == ["x"]
    assert refused["x"] == "contribution norm 120 is 120x the round's median 1 (bound 4x)"
    assert out_of_bound({"a": 1.0, "x": 100.0}, bound=4.0).keys() == {"x"}  # two members: the smaller is the median
    assert out_of_bound({"a": 1.0, "x": float("inf")}, bound=4.0).keys() == {"x"}
    assert out_of_bound({"a": 1.0, "x": 100.0}, bound=0) == {}  # off


def _pieces(n: int, numel: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(numel, generator=g) for _ in range(n)]


def test_trimmed_mean_drops_the_extremes_of_every_coordinate() -> None:
    pieces = _pieces(5, 1000)
    pieces[3] = pieces[3] * 1e6  # an attacker
    out = aggregate(Rule("trimmed-mean", 1), pieces, torch.empty(1000), None)
    ref = np.sort(np.stack([p.numpy() for p in pieces]), axis=0)[1:4].mean(axis=0)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6, atol=1e-6)
    assert float(out.abs().max()) < 10  # the ×1e6 values never reach the result
    # Too few members for the trim: it falls back to the median (1 of 3 dropped at each end).
    three = aggregate(Rule("trimmed-mean", 5), pieces[:3], torch.empty(1000), None)
    np.testing.assert_array_equal(three.numpy(), np.median(np.stack([p.numpy() for p in pieces[:3]]), axis=0))


def test_clipped_mean_scales_each_contribution_down_to_the_median_norm() -> None:
    pieces = _pieces(4, 500, seed=1)
    pieces[2] = pieces[2] * 100
    norms = [float(p.norm()) for p in pieces]
    w = weights(Rule("clipped-mean"), norms)
    assert w is not None and w[2] == pytest.approx(median_norm(norms) / norms[2]) and w[0] <= 1.0
    out = aggregate(Rule("clipped-mean"), pieces, torch.empty(500), w)
    ref = sum(p.numpy() * wi for p, wi in zip(pieces, w, strict=True)) / 4
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)
    assert weights(Rule("mean"), norms) is None


def test_a_part_above_its_senders_declared_norm_fails_that_sender_only() -> None:
    codec = make_codec(CodecConfig(name="none"))
    pieces = _pieces(3, 256, seed=2)
    norms = [float(p.norm()) for p in pieces]
    liar = [norms[0], norms[1] / 100, norms[2]]  # b declares a hundredth of what it sends
    payloads = [codec.encode(p) for p in pieces]
    with pytest.raises(PeerFailure) as info:
        reduce_payloads(codec, payloads, ["a", "b", "c"], "a", torch.empty(256), norms=liar)
    assert info.value.peer == "b" and "while declaring" in info.value.reason
    # Honest declarations pass, and so does a part (a slice) of an honest contribution.
    reduce_payloads(codec, payloads, ["a", "b", "c"], "a", torch.empty(256), norms=norms)
    parts = [codec.encode(p[:64]) for p in pieces]
    reduce_payloads(codec, parts, ["a", "b", "c"], "a", torch.empty(64), norms=norms)


@pytest.mark.parametrize("codec_name", ["none", "int8", "sparseloco"])
def test_the_declared_norm_is_that_of_the_payload_every_part_is_checked_against(codec_name: str) -> None:
    codec = make_codec(CodecConfig(name=codec_name))
    x = torch.randn(4096, generator=torch.Generator().manual_seed(3)) ** 3  # heavy tails: quantisation errs most
    feedback = ErrorFeedback() if codec.uses_error_feedback else None
    c = Contribution(x, codec, feedback)
    declared = c.norm()
    whole = codec.decode(c.encode(0, 4096), 4096)
    assert declared == pytest.approx(float(whole.norm()), rel=1e-6)
    # Parts on the codec's grid decode to pieces of that same whole: none exceeds the declared norm.
    reduce_payloads(codec, [c.encode(0, 2048)], ["a"], None, torch.empty(2048), norms=[declared])


def test_a_local_group_refuses_an_out_of_bound_member_and_averages_the_rest() -> None:
    group = LocalGroup(4, norm_bound=4.0)
    states, threads_out = [], {}

    def member(i: int) -> None:
        state = GlobalState(torch.zeros(64), OuterConfig(lr=1.0, momentum=0.0))
        m = group.member(i)
        m.start(state)
        x = torch.full((64,), 1.0 + i) * (1000.0 if i == 3 else 1.0)
        threads_out[i] = m.sync(Contribution(x, make_codec(CodecConfig(name="none"))))
        states.append(state)

    threads = [threading.Thread(target=member, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert list(group.refused[0]) == ["member 3"]
    assert len({s.digest for s in states}) == 1
    # The mean of members 0..2 (Δ = 1, 2, 3) with outer lr 1: θ = 0 - 2.
    assert torch.equal(states[0].theta, torch.full((64,), -2.0))


# -- the coordinator

ROBUST = replace(CFG, norm_bound=4.0, aggregate="trimmed-mean", quarantine_after=2, quarantine_rounds=5)


def _round(sim: Sim, now: float, number: int, norms: dict[str, float]) -> None:
    for p, n in norms.items():
        if p not in sim.state.members:
            sim.join(now, p)
    for p, n in norms.items():
        sim.do(now, Arrive(RUN, p, inc(p), 0, number, "", n))


def test_the_coordinator_refuses_an_out_of_bound_contribution_names_it_and_quarantines_repeats() -> None:
    sim = Sim(ROBUST)
    _round(sim, 0.0, 0, {"a": 1.0, "b": 1.1, "c": 0.9, "x": 100.0})
    rnd = sim.round(0)
    assert rnd.phase == "running" and rnd.members == ("a", "b", "c") and rnd.aggregate == "trimmed-mean:1"
    assert dict(rnd.refused)["x"].startswith("contribution norm 100 is")
    assert any("refused x" in why for why in rnd.reasons)
    # Every member gets everyone's declared norm and the rule in the attempt.
    view = views.rendezvous(sim.state, 1.0, "a", 0, 0)
    assert view.attempt is not None and view.attempt.norms == (1.0, 1.1, 0.9)
    assert view.attempt.aggregate == "trimmed-mean:1"
    # The refused member is told why, and resyncs from a member that will hold the committed state.
    told = views.rendezvous(sim.state, 1.0, "x", 0, 0)
    assert told.outcome == "missed" and "refused your contribution" in told.reason and "100" in told.reason
    assert told.refused  # so it does not carry the refused update into its next round (late="fold")
    for p in ("a", "b", "c"):
        sim.commit(2.0, p, 0, 1, "11111111aaaa")
    assert quarantined(sim.state, 0, ROBUST) == {}
    _round(sim, 3.0, 1, {"a": 1.0, "b": 1.1, "c": 0.9, "x": 100.0})
    for p in ("a", "b", "c"):
        sim.commit(4.0, p, 1, 1, "22222222bbbb")
    assert "x" in quarantined(sim.state, 0, ROBUST)
    # Quarantined: left out even with an honest-looking norm, until its refusals age out of the window.
    _round(sim, 5.0, 2, {"a": 1.0, "b": 1.1, "c": 0.9, "x": 1.0})
    assert sim.round(2).members == ("a", "b", "c")
    assert dict(sim.round(2).refused)["x"].startswith("quarantined: refused in 2 of the last 5 rounds")


def test_with_the_bound_off_nothing_is_refused_and_a_norm_is_only_recorded() -> None:
    sim = Sim()
    _round(sim, 0.0, 0, {"a": 1.0, "x": 1000.0})
    rnd = sim.round(0)
    assert rnd.members == ("a", "x") and rnd.refused == () and rnd.aggregate == "mean"


def test_a_member_declaring_no_norm_among_members_that_did_is_refused() -> None:
    sim = Sim(ROBUST)
    sim.join(0.0, "x")
    _round(sim, 0.0, 0, {"a": 1.0, "b": 1.0})
    sim.do(0.0, Arrive(RUN, "x", inc("x"), 0, 0, ""))  # (the last to arrive: the round starts)
    assert sim.round(0).members == ("a", "b")
    assert dict(sim.round(0).refused) == {"x": "declared no contribution norm"}


def test_a_declared_norm_must_be_a_finite_number() -> None:
    from swarm.coordinator.errors import InvalidRequest

    sim = Sim(ROBUST)
    sim.join(0.0, "a")
    for bad in (float("nan"), float("inf"), -1.0):
        sim.rejects(0.0, Arrive(RUN, "a", inc("a"), 0, 0, "", bad), InvalidRequest)


# -- over the data plane

@pytest.mark.parametrize("name", ["none", "int8", "sparseloco"])
@pytest.mark.parametrize("rule", ["clipped-mean", "trimmed-mean:1"])
async def test_the_butterfly_with_a_robust_rule_is_bit_identical_and_matches_the_reference(name: str,
                                                                                           rule: str) -> None:
    codec, how, peers, numel = make_codec(CodecConfig(name=name)), Rule.parse(rule), 4, 20_001
    eps = [Endpoint(f"p{i}", "r", TransportConfig(chunk_bytes=16 << 10), FaultInjector()) for i in range(peers)]
    for ep in eps:
        await ep.start()
    try:
        xs = [torch.randn(numel, generator=torch.Generator().manual_seed(i)) for i in range(peers)]
        xs[2] = xs[2] * 100  # an attacker the rule must tame
        contributions = [Contribution(x, codec) for x in xs]
        norms = [c.norm() for c in contributions]
        members = [Participant(e.peer_id, e.address, 0.0, n) for e, n in zip(eps, norms, strict=True)]
        seen = [Directions.of(peers) for _ in eps]
        outs = await asyncio.gather(*(allreduce_attempt(e, c, members, 0, 1, 10.0, how, d)
                                      for e, c, d in zip(eps, contributions, seen, strict=True)))
        assert len({o.numpy().tobytes() for o in outs}) == 1
        # The reference: per part, the rule over every member's decoded part (then the result codec).
        want = torch.empty(numel)
        gathered = gathers_payloads(codec, numel, peers)
        result = None if gathered else codec.result_codec(peers)
        directions = Directions.of(peers)  # the whole tensor's, as the coordinator adds the owners' reports up
        for start, length in parts_for(codec, numel, [0.0] * peers):
            if length:
                payloads = [codec.encode(x[start : start + length]) for x in xs]
                part = reduce_payloads(codec, payloads, [m.peer_id for m in members], None, torch.empty(length),
                                       rule=how, norms=norms, directions=directions)
                if result is not None:
                    encode_result(result, part)
                want[start : start + length] = part
        assert outs[0].numpy().tobytes() == want.numpy().tobytes()
        # What each member reports with its commit adds up (butterfly: one part each) to the whole's directions.
        if gathered:
            assert all(d.all_parts and d.dots == pytest.approx(directions.dots, rel=1e-4) for d in seen)
        else:
            assert [sum(d.dots[i] for d in seen) for i in range(peers)] == pytest.approx(directions.dots, rel=1e-4)
            assert sum(d.mean_sq for d in seen) == pytest.approx(directions.mean_sq, rel=1e-4)
        honest = torch.stack([xs[i] for i in (0, 1, 3)]).abs().max()
        assert float(outs[0].abs().max()) <= float(honest) * 1.01  # nothing of the ×100 gets past the rule
    finally:
        for ep in eps:
            await ep.close()


async def test_over_the_wire_the_join_asks_for_norms_and_status_shows_the_quarantine(server_factory,
                                                                                     make_client) -> None:  # type: ignore[no-untyped-def]
    from swarm.proto.v1 import coordinator_pb2 as pb

    srv = await server_factory(norm_bound=4.0, aggregate="clipped-mean", quarantine_after=1, quarantine_rounds=5,
                               min_peers=3)
    peers = ["a", "b", "x"]
    clients = [make_client(srv, p) for p in peers]
    for i, c in enumerate(clients):
        joined = await c.join(f"127.0.0.1:{5000 + i}")
        assert joined.declare_norms
    norms = {"a": 1.0, "b": 1.5, "x": 900.0}
    replies = await asyncio.gather(*(c.rendezvous(0, 0, wait_s=5.0, norm=norms[p])
                                     for p, c in zip(peers, clients, strict=True)))
    started = [r for r in replies if r.outcome == pb.RendezvousReply.STARTED]
    assert len(started) == 2 and [m.peer_id for m in started[0].attempt.members] == ["a", "b"]
    assert list(started[0].attempt.norms) == [1.0, 1.5] and started[0].attempt.aggregate == "clipped-mean"
    refused = replies[2]
    assert refused.outcome == pb.RendezvousReply.MISSED and "refused your contribution" in refused.reason
    assert refused.refused and not any(r.refused for r in started)
    status = await clients[0].status()
    shown = {m.member.peer_id: m.quarantined for m in status.members}
    assert shown["a"] == "" and shown["x"].startswith("refused in 1 of the last 5 rounds")
    assert any("refused x" in why for why in status.rounds[0].reasons)
    # Without robust options the Join does not ask (an encode more per round for nothing).
    plain = await server_factory()
    assert not (await make_client(plain, "p").join("127.0.0.1:5009")).declare_norms


def test_a_member_caught_over_its_declared_norm_by_two_members_counts_towards_its_quarantine() -> None:
    from swarm.coordinator.decisions import ReportFailure

    sim = Sim(ROBUST)
    _round(sim, 0.0, 0, {"a": 1.0, "b": 1.0, "c": 1.0, "x": 1.0})
    lie = "sent a part of norm 50 while declaring 1 for its whole contribution"
    for reporter in ("a", "b"):
        sim.do(1.0, ReportFailure(RUN, reporter, inc(reporter), 0, 0, 1, "x", lie))
    sim.tick(1.0 + ROBUST.report_window_s)
    rnd = sim.round(0)
    assert rnd.attempt == 2 and "x" not in rnd.members
    assert dict(rnd.refused) == {"x": "sent more than the norm it declared"}
    # One accuser alone could be the liar: its word is not a strike against anyone.
    sim2 = Sim(ROBUST)
    _round(sim2, 0.0, 0, {"a": 1.0, "b": 1.0, "c": 1.0, "x": 1.0})
    sim2.do(1.0, ReportFailure(RUN, "a", inc("a"), 0, 0, 1, "x", lie))
    sim2.tick(1.0 + ROBUST.report_window_s)
    assert sim2.round(0).attempt == 2 and sim2.round(0).refused == ()


def _commit_with(sim: Sim, now: float, number: int, peer: str, dots: tuple[float, ...], mean_sq: float,
                 all_parts: bool = False) -> None:
    from swarm.coordinator.decisions import Commit

    sim.do(now, Commit(RUN, peer, inc(peer), 0, number, 1, "11111111aaaa", dots, mean_sq, all_parts))


def test_a_member_whose_update_points_against_the_mean_is_named_and_quarantined() -> None:
    sim = Sim(ROBUST)
    for number in (0, 1, 2):
        _round(sim, 10.0 * number, number, {"a": 1.0, "b": 1.0, "c": 1.0, "x": 1.0})
        if number == 2:
            break
        # Butterfly: each owner reports its part. x's part of the update is opposite to the mean in every part.
        for owner in ("a", "b", "c", "x"):
            _commit_with(sim, 10.0 * number + 1, number, owner, (0.12, 0.1, 0.11, -0.08), 0.04)
        rnd = sim.round(number)
        assert rnd.phase == "committed" and dict(rnd.refused) == {
            "x": "its update points against the round's mean (cosine -0.80)"}, rnd.refused
        assert "x: its update points against" in rnd.reasons[-1]
    assert sim.round(2).members == ("a", "b", "c")  # quarantined after 2 rounds against the mean
    assert dict(sim.round(2).refused)["x"].startswith("quarantined")


def test_one_reporter_lying_about_the_directions_cannot_flag_an_honest_member() -> None:
    sim = Sim(ROBUST)
    _round(sim, 0.0, 0, {"a": 1.0, "b": 1.0, "c": 1.0, "x": 1.0})
    # Gathered payloads: every member reduced every part; x claims a points against the mean (and far beyond
    # what the norms allow: clamped), the others see it aligned.
    for p in ("a", "b", "c"):
        _commit_with(sim, 1.0, 0, p, (0.5, 0.5, 0.5, 0.5), 0.25, all_parts=True)
    _commit_with(sim, 1.0, 0, "x", (-99.0, 0.5, 0.5, 0.5), 0.25, all_parts=True)
    assert sim.round(0).phase == "committed" and sim.round(0).refused == ()


def test_without_the_bound_directions_are_not_judged() -> None:
    sim = Sim(replace(CFG, aggregate="trimmed-mean"))
    _round(sim, 0.0, 0, {"a": 1.0, "x": 1.0})
    for p in ("a", "x"):
        _commit_with(sim, 1.0, 0, p, (0.1, -0.1), 0.04)
    assert sim.round(0).phase == "committed" and sim.round(0).refused == ()


def test_swarm_status_shows_a_quarantine_and_shows_peers_text_literally() -> None:
    from rich.console import Console

    from swarm.cli.status_cmd import render
    from swarm.proto.v1 import coordinator_pb2 as pb

    status = pb.StatusReply(run_id="r", members=[pb.MemberStatus(
        member=pb.Member(peer_id="x", address="10.0.0.7:7100"), quarantined="refused in 3 of the last 10 rounds")],
        events=[pb.Event(ago_s=1.0, reason="x left: [bold red]not markup[/]")])
    console = Console(width=200, record=True)
    console.print(render(status))
    text = console.export_text()
    assert "10.0.0.7:7100 (quarantined: refused in 3 of the last 10 rounds)" in text
    assert "x left: [bold red]not markup[/]" in text
