"""DiLoCo hooks: the outer step, bit-identical members, resync checks, and the step hook."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from swarm.compression import Contribution
from swarm.diloco import DiLoCo, GlobalState, LocalGroup, OuterConfig
from swarm.diloco.hooks import _cut
from swarm.peer import RoundState, SyncResult
from swarm.transport.endpoint import StateSnapshot


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _train_members(n: int, steps: int, H: int, codec: str, outer: OuterConfig,
                   fragments: int = 1) -> tuple[list[DiLoCo], LocalGroup]:
    """n members in threads, each on its own data, all starting from the same weights."""
    group = LocalGroup(n)
    hooks: list[DiLoCo] = []
    errors: list[BaseException] = []
    models = [_model(0) for _ in range(n)]  # here, not in the threads: the global RNG is not thread-safe

    def worker(i: int) -> None:
        try:
            model = models[i]
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            gen = torch.Generator().manual_seed(100 + i)
            with DiLoCo(model, opt, peer=group.member(i), sync_every=H, outer=outer, codec=codec,
                        fragments=fragments) as dl:
                hooks.append(dl)
                for _ in range(steps):
                    x = torch.randn(32, 8, generator=gen)
                    loss = ((model(x) - x[:, :4].sin()) ** 2).mean()
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
        except BaseException as e:  # noqa: BLE001 - surfaced below: a failing thread must fail the test
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return hooks, group


@pytest.mark.parametrize("codec", ["none", "int8", "sparseloco"])
def test_members_end_bit_identical(codec: str) -> None:
    hooks, group = _train_members(3, steps=30, H=5, codec=codec, outer=OuterConfig())
    assert group.rounds == 6 and all(h.stats.committed == 6 for h in hooks)
    assert len({h.state.digest for h in hooks}) == 1
    thetas = [h.state.theta for h in hooks]
    assert all(torch.equal(thetas[0], t) for t in thetas[1:])
    # The model holds θ_global right after a sync.
    for h in hooks:
        assert torch.equal(torch.cat([p.detach().reshape(-1) for p in h.params]), h.state.theta)


def test_outer_lr_one_without_momentum_averages_the_models() -> None:
    """With outer lr 1 and no momentum, θ_global − mean(θ_global − θ_i) is the mean of the local models."""
    n, H = 3, 4
    group = LocalGroup(n)
    locals_: list[torch.Tensor] = [torch.empty(0)] * n
    results: list[torch.Tensor] = [torch.empty(0)] * n
    models = [_model(0) for _ in range(n)]

    def worker(i: int) -> None:
        model = models[i]
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        # sync_every beyond the steps taken: the test syncs by hand, after recording the local model.
        with DiLoCo(model, opt, peer=group.member(i), sync_every=1000, outer=OuterConfig(lr=1.0, momentum=0.0)) as dl:
            gen = torch.Generator().manual_seed(i)
            for _ in range(H):
                model(torch.randn(4, 8, generator=gen)).sum().backward()
                opt.step()
                opt.zero_grad()
            locals_[i] = dl._flat_params()
            dl.sync()
            results[i] = dl.state.theta.clone()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    mean = torch.stack(locals_).mean(0)
    for r in results:
        torch.testing.assert_close(r, mean, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("codec", "expected"), [
    ("sparseloco", (1.0, 0.0, 0.95)),  # SparseLoCo's recipe: the decayed residual is the momentum
    ("int8", (0.7, 0.9, 1.0)),  # DiLoCo's
    ("topk", (0.7, 0.9, 1.0)),
])
def test_without_an_outer_config_the_codec_picks_its_recipe(codec: str, expected: tuple) -> None:
    group = LocalGroup(1)
    model = _model(0)
    dl = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), peer=group.member(0), codec=codec)
    assert (dl.outer.lr, dl.outer.momentum, dl.outer.feedback_decay) == expected
    given = OuterConfig(lr=0.5)
    assert DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), peer=group.member(0), codec=codec,
                  outer=given).outer is given


def test_peer_flags_override_only_what_they_name_of_the_recipe() -> None:
    from swarm.cli.main import build_parser
    from swarm.peers.cli import _training

    def outer(*flags: str) -> tuple:
        config = _training(build_parser().parse_args(["peer", "--coordinator", "127.0.0.1:1", "--task", "train",
                                                      *flags]))
        o = config.outer or OuterConfig.recipe(config.codec.name)  # None: DiLoCo takes the codec's recipe
        return o.lr, o.momentum, o.feedback_decay

    assert outer() == (0.7, 0.9, 1.0)
    assert outer("--codec", "sparseloco") == (1.0, 0.0, 0.95)
    assert outer("--codec", "sparseloco", "--outer-lr", "2") == (2.0, 0.0, 0.95)
    assert outer("--codec", "int8", "--outer-momentum", "0", "--feedback-decay", "0.5") == (0.7, 0.0, 0.5)


def test_outer_step_matches_torch_sgd_nesterov() -> None:
    torch.manual_seed(0)
    theta = torch.randn(1000)
    outer = OuterConfig(lr=0.7, momentum=0.9, nesterov=True)
    state = GlobalState(theta, outer)
    ref = theta.clone().requires_grad_(True)
    sgd = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=True)
    for round_ in range(4):
        g = torch.randn(1000)
        state.propose(g, round_)
        state.adopt(round_)
        ref.grad = g.clone()
        sgd.step()
    torch.testing.assert_close(state.theta, ref.detach(), rtol=1e-6, atol=1e-6)


def test_propose_leaves_the_committed_state_alone_until_adopt() -> None:
    state = GlobalState(torch.ones(10), OuterConfig())
    before, digest = state.theta.clone(), state.digest
    h1 = state.propose(torch.full((10,), 0.5), 0)
    h2 = state.propose(torch.full((10,), 0.25), 0)  # a RETRY: another attempt, another mean
    assert h1 != h2 and state.digest == digest and torch.equal(state.theta, before)
    state.adopt(0)
    assert state.digest == h2 and state.round == 0
    with pytest.raises(ValueError, match="elements"):
        state.propose(torch.zeros(3), 1)


def test_restore_checks_the_donors_state_and_changes_nothing_when_it_is_bad() -> None:
    donor = GlobalState(torch.arange(10, dtype=torch.float32), OuterConfig())
    donor.propose(torch.ones(10), 0)
    donor.adopt(0)
    good = donor.snapshot()
    assert good is not None and good.meta["round"] == 0
    joiner = GlobalState(torch.zeros(10), OuterConfig())
    digest = joiner.digest
    bad = [
        StateSnapshot(dict(good.meta, hash="0" * 32), good.arrays),  # hash does not match the arrays
        StateSnapshot(good.meta, {"theta": np.zeros(9, np.float32), "momentum": good.arrays["momentum"]}),
        StateSnapshot(good.meta, {"theta": good.arrays["theta"]}),
        StateSnapshot(good.meta, {"theta": good.arrays["theta"].astype(np.float64), "momentum": good.arrays["momentum"]}),
    ]
    for snap in bad:
        with pytest.raises(ValueError):
            joiner.restore(snap)
        assert joiner.digest == digest and joiner.round == -1
    nan = good.arrays["theta"].copy()
    nan[3] = np.nan
    from swarm.diloco.state import _digest

    with pytest.raises(ValueError, match="NaN"):
        joiner.restore(StateSnapshot(dict(good.meta, hash=_digest(nan, good.arrays["momentum"])),
                                     {"theta": nan, "momentum": good.arrays["momentum"]}))
    assert joiner.restore(good) == donor.digest and torch.equal(joiner.theta, donor.theta)
    assert joiner.round == 0


class _Recorder:
    """An averager that answers each round with this peer's own decoded payload (a swarm of one)."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.payloads: list[torch.Tensor] = []
        self.state: RoundState | None = None
        self.closed = ""

    def start(self, state: RoundState) -> None:
        self.state = state

    def sync(self, contribution: Contribution) -> SyncResult:
        assert self.state is not None
        self.calls.append(len(self.calls))
        payload = contribution.encode(0, contribution.numel).clone()
        self.payloads.append(payload)
        self.state.propose(contribution.codec.decode(payload, contribution.numel), len(self.calls) - 1, None)
        self.state.adopt(len(self.calls) - 1)
        contribution.commit()
        return SyncResult("committed", len(self.calls) - 1, 1)

    def close(self, reason: str) -> None:
        self.closed = reason


def test_the_hook_syncs_every_h_inner_steps_and_closes_the_peer() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    peer = _Recorder()
    with DiLoCo(model, opt, peer=peer, sync_every=7):
        for _ in range(30):
            model(torch.randn(2, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
    assert len(peer.calls) == 4 and peer.closed == "done"
    opt.step()  # the hook is gone after the with block
    assert len(peer.calls) == 4


@pytest.mark.parametrize("decay", [1.0, 0.5])
def test_each_round_sends_delta_plus_the_decayed_residual(decay: float) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    peer = _Recorder()
    expected: list[torch.Tensor] = []
    outer = OuterConfig(lr=1.0, momentum=0.0, feedback_decay=decay)
    with DiLoCo(model, opt, peer=peer, sync_every=1000, outer=outer, codec="sparseloco") as dl:
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            for _ in range(4):
                model(torch.randn(4, 8, generator=gen)).sum().backward()
                opt.step()
                opt.zero_grad()
            delta = dl.state.theta - dl._flat_params()
            residual = dl.feedback.residual
            expected.append(delta if residual is None else delta + decay * residual)
            dl.sync()
            acc = expected[-1]
            # What the round did not carry waits for the next one, undecayed until it is sent.
            assert torch.equal(dl.feedback.residual, acc - dl.codec.decode(dl.codec.encode(acc), acc.numel()))
            assert dl.feedback.residual.abs().sum() > 0  # so the next round's β actually matters
    assert len(peer.payloads) == 3
    for sent, want in zip(peer.payloads, expected, strict=True):
        assert torch.equal(sent, dl.codec.encode(want))


class _LateOnce(_Recorder):
    """Its first round starts without this peer: it resyncs to a donor's θ_global (here θ_global + 0.5)."""

    def __init__(self, missed: bool = True) -> None:
        super().__init__()
        self.missed = missed
        self.late_delta: torch.Tensor | None = None

    def sync(self, contribution: Contribution) -> SyncResult:
        assert self.state is not None
        if self.calls:
            return super().sync(contribution)
        self.calls.append(0)
        self.late_delta = contribution.x.clone()  # θ_global − θ_local when it came late
        self.state.theta.add_(0.5)
        return SyncResult("resynced", 0, reason="the round started without this peer", missed=self.missed)


@pytest.mark.parametrize(("late", "missed", "kept"), [("fold", True, True), ("discard", True, False),
                                                      ("fold", False, False)])
def test_a_late_peer_folds_its_inner_steps_into_its_next_round(late: str, missed: bool, kept: bool) -> None:
    """fold: after a round that started without it, θ_local = the new θ_global + the local progress it brought
    (its next Δ carries those steps); discard, or a resync that is not for lateness (a diverged hash): θ_global."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    peer = _LateOnce(missed)
    gen = torch.Generator().manual_seed(0)
    with DiLoCo(model, opt, peer=peer, sync_every=3, late=late) as dl:
        start = dl.state.theta.clone()
        for step in range(6):
            if step == 3:
                assert peer.late_delta is not None and peer.late_delta.abs().sum() > 0
                assert torch.equal(dl.state.theta, start + 0.5)
                offset = dl._flat_params() - dl.state.theta
                assert torch.allclose(offset, -peer.late_delta if kept else torch.zeros_like(offset), atol=1e-6)
            model(torch.randn(4, 8, generator=gen)).sum().backward()
            opt.step()
            opt.zero_grad()
    assert (dl.stats.folded, dl.stats.resynced, dl.stats.committed) == (int(kept), 1, 1)


def test_nan_in_the_local_model_stops_the_sync_instead_of_spreading() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    peer = _Recorder()
    with pytest.raises(FloatingPointError, match="NaN"), DiLoCo(model, opt, peer=peer, sync_every=1):
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        opt.step()
    assert peer.calls == [] and peer.closed == "FloatingPointError"


def test_bad_settings_are_refused() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="late"):
        DiLoCo(model, opt, peer=_Recorder(), late="keep")
    with pytest.raises(ValueError, match="sync_every"):
        DiLoCo(model, opt, peer=_Recorder(), sync_every=0)
    with pytest.raises(ValueError, match="outer.lr"):
        OuterConfig(lr=0)
    with pytest.raises(ValueError, match="feedback_decay"):
        OuterConfig(feedback_decay=0)
    with pytest.raises(ValueError, match="codec.name"):
        DiLoCo(model, opt, peer=_Recorder(), codec="zip")


@pytest.mark.parametrize("codec", ["none", "sparseloco"])
def test_streaming_syncs_one_fragment_per_stride_and_members_stay_identical(codec: str) -> None:
    hooks, group = _train_members(3, steps=24, H=8, codec=codec, outer=OuterConfig(), fragments=2)
    assert group.rounds == 6  # a fragment every H / fragments = 4 steps
    assert all(h.stats.committed == 6 for h in hooks)
    assert len({h.state.digest for h in hooks}) == 1
    # Both fragments moved away from the initial weights.
    start = torch.cat([p.detach().reshape(-1) for p in _model(0).parameters()])
    for part in hooks[0].fragments:
        assert not torch.equal(hooks[0].state.theta[part], start[part])


class _SlowThirdRound(_Recorder):
    """A swarm of one whose third round ends only when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()

    def sync(self, contribution: Contribution) -> SyncResult:
        if len(self.calls) == 2:
            assert self.go.wait(timeout=30), "the test never released the round"
        return super().sync(contribution)


def test_a_streaming_round_in_flight_counts_in_the_steps_so_a_loop_to_n_steps_launches_no_extra_round() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    peer = _SlowThirdRound()
    with DiLoCo(model, opt, peer=peer, sync_every=8, fragments=2) as dl:
        while dl.steps < 12:  # three strides of 4 steps: round 2 goes out at step 12 and stays in flight
            model(torch.randn(2, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
        try:
            assert dl.steps == 12 and dl.local_step == 0
            # Round 1 may or may not be back yet (the sync thread's pace), and the peer adopts a round's state
            # (state.round) before the hooks apply it: round 2 is in flight, round 1 in flight or applied.
            rounds = [sent.round for sent in dl._in_flight]
            assert rounds in ([1, 2], [2]) and dl.state.round in (0, 1)
            assert rounds == [1, 2] or dl.state.round == 1, "a round left the queue before the peer committed it"
            assert len(peer.calls) <= 2  # the third waits for the test
        finally:
            peer.go.set()
    assert len(peer.calls) == 3 and dl.state.round == 2, "the round in flight completes on leaving; none more"


def test_streaming_goes_on_training_while_a_slow_round_is_in_flight_and_sends_the_next_fragment() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    peer = _SlowThirdRound()
    with DiLoCo(model, opt, peer=peer, sync_every=8, fragments=2) as dl:
        while dl.steps < 16:  # round 2 (fragment 0) is stuck; round 3 (fragment 1) goes out at step 16 anyway
            model(torch.randn(2, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
        assert [r.round for r in dl._in_flight] == [2, 3] and dl.stats.waited_s < 1.0
        assert dl.state.round == 1 and len(peer.calls) == 2  # (the third waits; the fourth is queued behind it)
        peer.go.set()
    assert len(peer.calls) == 4 and dl.state.round == 3 and not dl._in_flight


def test_fragments_cut_on_parameter_boundaries() -> None:
    params = [nn.Parameter(torch.zeros(n)) for n in (10, 10, 10, 70)]
    parts = _cut(params, 2)
    assert parts == [slice(0, 30), slice(30, 100)]
    assert _cut(params, 4) == [slice(0, 10), slice(10, 20), slice(20, 30), slice(30, 100)]
    with pytest.raises(ValueError, match="fragments"):
        _cut(params, 5)
    model = _model()
    with pytest.raises(ValueError, match="divide"):
        DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), peer=_Recorder(), sync_every=10, fragments=3)


def test_a_swarm_peer_is_made_from_an_address_and_a_run_id_alone() -> None:
    import swarm

    peer = swarm.SwarmPeer(coordinator="127.0.0.1:1", run_id="run1", peer_id="me")
    try:
        assert peer.config.client.target == "127.0.0.1:1"
        assert (peer.config.client.run_id, peer.config.client.peer_id) == ("run1", "me")
    finally:
        peer.close()  # never joined: leaving the unreachable coordinator gives up quickly
    unnamed = swarm.SwarmPeer(coordinator="127.0.0.1:1")
    unnamed.close()
    assert unnamed.config.client.peer_id  # a default id
    with pytest.raises(ValueError, match="either config"):
        swarm.SwarmPeer()
    with pytest.raises(ValueError, match="host:port"):
        swarm.SwarmPeer(coordinator="no-port")
