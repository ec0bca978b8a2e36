"""The simulator's model of the world outside the coordinator: peers' hardware, links, churn and the
bytes and seconds of a round's all-reduce (scripts/simulate.py).

Everything here is a plain function of a seeded `random.Random`, so a run is reproducible from its
seed. The coordinator itself is not modelled: scripts/sim_engine.py drives the real
`swarm.coordinator.decisions.decide`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

from swarm.compression import CodecConfig, make_codec

LatePolicy = Literal["discard", "fold"]
MBIT = 1e6 / 8
"""Bytes per second in one Mbit/s."""


@dataclass(kw_only=True, slots=True)
class SimConfig:
    """One simulated run: the swarm, its churn and the coordinator's straggler policy."""

    peers: int = 100
    """Peers at the start (all join at t=0, in a random order within --join-spread-s)."""
    rounds: int = 5
    """Stop once this many rounds finished (committed or aborted)."""
    max_sim_s: float = 86_400.0
    """Stop after this much simulated time even if fewer rounds finished."""
    seed: int = 0
    """Seed of every random draw (speeds, links, churn, hashes of nothing)."""
    inner_steps: int = 500
    """H: inner steps a peer computes between two rounds."""
    step_s: float = 0.2
    """Seconds one inner step takes at speed 1.0 (so a 1.0x peer computes a round in H * step_s)."""
    speed: str = "1.0:0.5,0.5:0.3,2.0:0.2"
    """Compute speeds: "S:FRACTION,..." (a mix of GPU classes), "lognormal:SIGMA" (median 1), "const:S" or
    "list:S0,S1,..." (peer i gets S(i mod n): a deliberate straggler)."""
    bandwidth_mbit: float = 100.0
    """Median link bandwidth (Mbit/s, the smaller of up and down), lognormal across peers."""
    bandwidth_sigma: float = 0.5
    """Sigma of the bandwidth's lognormal (0: every peer the median)."""
    latency_ms: tuple[float, float] = (20.0, 150.0)
    """One-way latency of a peer, uniform in this range (ms)."""
    params: int = 124_000_000
    """Parameters of the model (the pseudo-gradient's length)."""
    codec: str = "int8"
    """The pseudo-gradient codec (swarm.compression names); byte counts come from the real codec."""
    state_bytes_per_param: float = 8.0
    """Bytes per parameter a resync downloads (fp32 θ_global + fp32 outer momentum)."""
    join_spread_s: float = 5.0
    """The initial peers join uniformly within this many seconds."""
    arrivals_per_h: float = 0.0
    """New peers joining per hour (Poisson)."""
    leaves_per_peer_h: float = 0.0
    """Graceful departures (Leave) per peer-hour."""
    crashes_per_peer_h: float = 0.0
    """Crashes per peer-hour: the peer goes silent, its lease expires, its all-reduce partners report it."""
    detect_s: float = 30.0
    """How long all-reduce partners take to notice a silent member (the transport's io_timeout_s)."""
    late: LatePolicy = "discard"
    """A peer that missed a round: drop its inner steps and resync (discard), or keep its pseudo-gradient and
    fold it into its next round (fold)."""
    crash_at: tuple[tuple[int, int], ...] = ()
    """Scripted crashes: (peer index, round): peer I crashes once round R started (validation against real runs)."""
    crash_delay_s: float | None = None
    """A scripted crash comes this long after its round started (None: 0.3 of the attempt, mid-all-reduce)."""
    ideal_allreduce: bool = False
    """Every member of an attempt finishes at the same time as the median link would (for analytic checks)."""


# ------------------------------------------------------------------ peers


@dataclass(slots=True)
class PeerSpec:
    """What one simulated peer is: drawn once when it is born."""

    speed: float
    """Inner steps per (step_s seconds): 2.0 computes a round in half the time of 1.0."""
    bandwidth: float
    """Bytes per second, the smaller of up and down."""
    latency_s: float
    """One-way latency to anyone (coordinator or peer)."""


def parse_speed(spec: str) -> list[tuple[float, float]] | tuple[str, float] | tuple[float, ...]:
    """Parse a --speed spec into a mix [(speed, fraction)], ("lognormal"|"const", value) or a tuple of speeds.

    Raises:
        ValueError: naming the spec and the accepted forms.
    """
    kind, _, value = spec.partition(":")
    try:
        if kind == "list":
            speeds = tuple(float(x) for x in value.split(","))
            if not speeds or not all(math.isfinite(x) and x > 0 for x in speeds):
                raise ValueError
            return speeds
        if kind in ("lognormal", "const"):
            number = float(value)
            if not (math.isfinite(number) and number > 0 or (kind == "lognormal" and number == 0)):
                raise ValueError
            return kind, number
        mix = [(float(s), float(f)) for s, f in (part.split(":") for part in spec.split(","))]
    except ValueError:
        raise ValueError(f"--speed {spec!r}: give S:FRACTION,... (e.g. 1.0:0.5,0.5:0.3,2.0:0.2), "
                         f"lognormal:SIGMA, const:S or list:S0,S1,...") from None
    if any(s <= 0 or f < 0 for s, f in mix) or not math.isclose(sum(f for _, f in mix), 1.0, abs_tol=1e-6):
        raise ValueError(f"--speed {spec!r}: speeds must be > 0 and fractions >= 0 summing to 1")
    return mix


def draw_peer(rng: random.Random, config: SimConfig, index: int) -> PeerSpec:
    """Draw peer `index`'s speed, bandwidth and latency (always the same draws, so a seed fixes them)."""
    speed_spec = parse_speed(config.speed)
    u, z, lat = rng.random(), rng.gauss(0.0, 1.0), rng.random()
    if isinstance(speed_spec, tuple) and not isinstance(speed_spec[0], str):
        speed = float(speed_spec[index % len(speed_spec)])
    elif isinstance(speed_spec, tuple):
        kind, value = speed_spec
        speed = value if kind == "const" else math.exp(value * rng.gauss(0.0, 1.0))
    else:
        speed, acc = speed_spec[-1][0], 0.0
        for s, f in speed_spec:
            acc += f
            if u < acc:
                speed = s
                break
    low, high = config.latency_ms
    return PeerSpec(speed=speed, bandwidth=config.bandwidth_mbit * MBIT * math.exp(config.bandwidth_sigma * z),
                    latency_s=(low + (high - low) * lat) / 1000)


# ------------------------------------------------------------------ bytes and seconds of a round


@dataclass(frozen=True, slots=True)
class RoundBytes:
    """Whole-tensor payload sizes of the real codec for one round of `members` members."""

    contribution: int
    """One member's encoded pseudo-gradient (Codec.payload_nbytes(params))."""
    result: int
    """The encoded mean (the result codec of `members` members)."""
    gather: bool
    """Members send each other whole payloads instead of reduce-scatter + all-gather (sparse codecs, few members)."""


def round_bytes(codec_name: str, params: int, members: int) -> RoundBytes:
    """The real codec's exact sizes (`payload_nbytes`, `result_codec`) and the all-reduce's choice of path.

    Raises:
        ValueError: an unknown codec name (from CodecConfig).
    """
    codec = make_codec(CodecConfig(name=codec_name))  # type: ignore[arg-type]
    members = max(1, members)
    contribution = codec.payload_nbytes(params)
    result = codec.result_codec(members).payload_nbytes(params)
    # Same rule as swarm.allreduce.reduce.gathers_payloads (not imported: the sizes above are all it needs).
    gather = members >= 2 and (members - 1) * contribution < result
    return RoundBytes(contribution, result, gather)


def member_bytes(sizes: RoundBytes, fraction: float, members: int) -> float:
    """Bytes one member moves in an attempt: the larger of what it sends and what it receives.

    Butterfly (parts sized by bandwidth, `fraction` = this member's share of the tensor): it sends its
    contribution's other parts, (1-f)·P, and its reduced part to every other member, (M-1)·f·R; it receives
    the others' contributions to its part, (M-1)·f·P, and the other reduced parts, (1-f)·R. With equal
    parts that is (M-1)/M·(P+R) each way, about 2(M-1)/M·B for a dense codec. Gather: (M-1)·P each way.
    """
    if members < 2:
        return 0.0
    if sizes.gather:
        return (members - 1) * sizes.contribution
    p, r, f = sizes.contribution, sizes.result, fraction
    send = (1 - f) * p + (members - 1) * f * r
    receive = (members - 1) * f * p + (1 - f) * r
    return max(send, receive)


RPC_LATENCIES = 4
"""One-way latencies an attempt costs a member besides its bytes: the start reply, connecting, the hand-over
between reduce-scatter and all-gather, and the commit."""


def attempt_seconds(specs: list[PeerSpec], sizes: RoundBytes, ideal: bool = False) -> tuple[float, float]:
    """(seconds until the attempt's slowest member finished, total bytes moved by its members).

    Each member's time is its bytes over its bandwidth plus RPC_LATENCIES of its latency; the attempt ends
    when the slowest member ends (every member needs every other member's part). `ideal`: every member
    takes the median member's time.
    """
    m = len(specs)
    total_bw = sum(s.bandwidth for s in specs) or 1.0
    times, moved = [], 0.0
    for s in specs:
        b = member_bytes(sizes, s.bandwidth / total_bw, m)
        moved += b
        times.append(b / s.bandwidth + RPC_LATENCIES * s.latency_s)
    if not times:
        return 0.0, 0.0
    times.sort()
    return (times[len(times) // 2] if ideal else times[-1]), moved


def resync_seconds(spec: PeerSpec, config: SimConfig) -> float:
    """Seconds to download the committed state from a donor (its link assumed no slower than ours)."""
    return config.params * config.state_bytes_per_param / spec.bandwidth + 2 * spec.latency_s


def state_hash(round_number: int) -> str:
    """The hash every holder of round `round_number`'s committed state reports (-1: the initial state)."""
    return f"{(round_number + 2) * 0x9E3779B97F4A7C15 % (1 << 64):016x}"
