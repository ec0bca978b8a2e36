"""DiLoCo members in one process: the swarm's averaging arithmetic without sockets."""

from __future__ import annotations

import threading

import torch

from swarm.allreduce.reduce import encode_result, gathers_payloads, reduce_payloads
from swarm.allreduce.robust import MEAN, Rule, declares_norms, out_of_bound
from swarm.compression import Codec, Contribution
from swarm.peer.state import RoundState, SyncResult


class LocalGroup:
    """N DiLoCo peers in one process (threads), averaging with the swarm all-reduce's arithmetic.

    For experiments and tests without sockets: each member encodes its contribution (with its error
    feedback) in its own thread, the payloads are decoded and reduced in member order in fp32
    (`swarm.allreduce.reduce`), and the mean goes through the codec's result codec, as the butterfly
    does. Bytes are counted as a butterfly would send them: each member sends (N−1)/N of its payload
    and of its part of the result. When that all-reduce would gather the payloads instead (sparse
    codecs), so does this: no result codec, and each member sends its payload to the N−1 others.

    Robust aggregation as the swarm does it: each member declares its contribution's norm; with
    `norm_bound`, out-of-bound members are left out of the round's mean (`refused` records them per
    round) and take the mean like everyone else, as a refused swarm peer resyncs to the committed state.

    Args:
        size: members; every member must call `sync` for a round to finish (an error in one breaks
            the group: the others' `sync` raises `threading.BrokenBarrierError`).
        rule: how rounds average (`swarm.allreduce.robust`).
        norm_bound: refuse contributions above this times the round's median norm (0: off).
    """

    def __init__(self, size: int, rule: Rule = MEAN, norm_bound: float = 0.0) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size, self.rule, self.norm_bound = size, rule, norm_bound
        self.refused: list[dict[str, str]] = []
        """Per round, the members ("member i") left out of the mean and why."""
        self._barrier = threading.Barrier(size)
        self._payloads: dict[int, torch.Tensor] = {}
        self._norms: dict[int, float | None] = {}
        self._mean: torch.Tensor | None = None
        self.bytes_sent = 0
        """Total over members, as a butterfly all-reduce would put on the wire."""
        self.rounds = 0

    def member(self, index: int) -> _LocalMember:
        """The averager of member `index` (0-based)."""
        return _LocalMember(self, index)

    def _reduce(self, codec: Codec, numel: int) -> None:
        ids = [f"member {i}" for i in range(self.size)]
        declared = {ids[i]: n for i, n in self._norms.items() if n is not None}
        refused = out_of_bound(declared, self.norm_bound)
        self.refused.append(refused)
        kept = [i for i in range(self.size) if ids[i] not in refused]
        n = len(kept)
        out = torch.empty(numel, dtype=torch.float32, device=self._payloads[0].device)
        reduce_payloads(codec, [self._payloads[i] for i in kept], [ids[i] for i in kept], None, out, rule=self.rule,
                        norms=[self._norms[i] for i in kept] if declared else None)
        if gathers_payloads(codec, numel, n):
            self.bytes_sent += n * (n - 1) * codec.payload_nbytes(numel)
        else:
            result = codec.result_codec(n)
            encode_result(result, out)
            if n > 1:
                self.bytes_sent += int((codec.payload_nbytes(numel) + result.payload_nbytes(numel)) * (n - 1))
        self._mean = out
        self.rounds += 1


class _LocalMember:
    def __init__(self, group: LocalGroup, index: int) -> None:
        self.group, self.index = group, index
        self.state: RoundState | None = None

    def start(self, state: RoundState) -> None:
        self.state = state

    def sync(self, contribution: Contribution) -> SyncResult:
        g = self.group
        assert self.state is not None
        try:
            robust = declares_norms(g.rule, g.norm_bound)
            g._norms[self.index] = contribution.norm() if robust else None  # (an encode more: only when used)
            g._payloads[self.index] = contribution.encode(0, contribution.numel)
            if g._barrier.wait() == 0:
                g._reduce(contribution.codec, contribution.numel)
            g._barrier.wait()
        except BaseException:
            g._barrier.abort()  # the others must not wait for a round that cannot finish
            raise
        assert g._mean is not None
        round_ = g.rounds - 1
        self.state.propose(g._mean, round_, None)
        self.state.adopt(round_)
        refused = f"member {self.index}" in g.refused[-1]
        if not refused:
            contribution.commit()
        g._barrier.wait()  # nobody starts the next round while another still reads this mean
        # A refused member takes the round's state as a refused swarm peer does: a resync (its residual is reset).
        return SyncResult("resynced" if refused else "committed", round_, g.size)

    def close(self, reason: str) -> None:
        if reason != "done":
            self.group._barrier.abort()  # a member that failed outside `sync`: the others must not wait for it
