"""The round life cycle: how a stage's rounds move on, given the run's state at a time `now`.

Pure functions, like the rest of the coordinator's decisions (`decisions.py` applies events and
calls these): nothing here reads a clock, touches a socket or mutates its input.

Round life cycle (per stage, rounds numbered 0, 1, ...):

    gathering --(all live members arrived, a quorum of them, or barrier deadline; >= min_peers)--> running(attempt 1)
    running(a) --(failure report / member lost before committing)--> running(a+1) | aborted
    running(a) --(every member of attempt a committed)--> committed
    running(a) --(attempt deadline)--> committed (with whoever committed) | aborted (nobody did)

A round's barrier deadline only starts once the stage's previous round has
finished, so a straggler that arrives early for round n+1 cannot start it
alone while everyone else is still busy with round n.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import replace

from swarm.allreduce.robust import OVER_DECLARED, QUARANTINED, out_of_bound
from swarm.coordinator.config import CoordinatorConfig
from swarm.coordinator.state import NO_CHANGE, Decision, Member, Round, RunState
from swarm.transport.meter import transfer_allowance_s


def _next_attempt(rnd: Round, now: float, survivors: tuple[str, ...], why: str, config: CoordinatorConfig) -> Round:
    if not survivors:
        return _abort(rnd, now, f"attempt {rnd.attempt} failed ({why}) and no member is left")
    if rnd.attempt >= config.max_attempts:
        return _abort(rnd, now, f"attempt {rnd.attempt} failed ({why}); max_attempts={config.max_attempts} reached")
    number = rnd.attempt + 1
    return replace(
        rnd,
        attempt=number,
        members=survivors,
        commits=(),
        accusations=(),
        directions=(),
        first_report_at=0.0,
        attempt_deadline=now + attempt_time_s(rnd, config),
        reasons=rnd.reasons + (f"attempt {number} with {len(survivors)} members: attempt {rnd.attempt} {why}",),
    )


def against(rnd: Round) -> dict[str, str]:
    """Members of the current attempt whose update points against the round's (robust) mean, and why.

    From the committers' reports (`Round.directions`): the cosine of each member's update with the reduced mean,
    from its declared norm. Each report's share is clamped to what its norms allow (Cauchy-Schwarz), so a lying
    reporter moves a cosine by at most its own part's share; where reporters reduced every part (gathered
    payloads), the upper median over them is taken, so one liar cannot flag an honest member.
    """
    norms = dict(rnd.norms)
    reports = [d for d in rnd.directions if len(d[1]) == len(rnd.members) and d[2] > 0]
    if not reports or not all(norms.get(p, 0.0) > 0 for p in rnd.members):
        return {}
    whole = [d for d in reports if d[3]]
    flagged = {}
    for i, p in enumerate(rnd.members):
        if whole:
            values = sorted(_share(d, i, norms[p]) / (norms[p] * math.sqrt(d[2])) for d in whole)
            cosine = values[len(values) // 2]
        else:
            cosine = sum(_share(d, i, norms[p]) for d in reports) / (norms[p] * math.sqrt(sum(d[2] for d in reports)))
        if cosine < 0:
            flagged[p] = f"its update points against the round's mean (cosine {cosine:.2f})"
    return flagged


def _share(report: tuple[str, tuple[float, ...], float, bool], i: int, norm: float) -> float:
    """Member i's dot product in `report`, clamped to what its declared `norm` and the report's mean allow."""
    bound = norm * math.sqrt(report[2]) * 1.001
    return max(-bound, min(bound, report[1][i]))


def attempt_time_s(rnd: Round, config: CoordinatorConfig) -> float:
    """How long an attempt of `rnd` may take: attempt_timeout_s, plus the time the largest payload a member
    declared needs on the slowest link allowed for (a backstop: members report a stalled member sooner)."""
    return config.attempt_timeout_s + transfer_allowance_s(rnd.payload_bytes)


def _abort(rnd: Round, now: float, why: str) -> Round:
    return replace(rnd, phase="aborted", finished_at=now, reasons=rnd.reasons + (f"aborted: {why}",))


def _finalize(rnd: Round, now: float, note: str, joined_at: Callable[[str], float],
              config: CoordinatorConfig) -> Round:
    """Commit the round with the majority hash of the current attempt's commits.

    Ties between equally large groups go to the group holding the longest-standing member (the
    earliest `joined_at`; then member order): an id is whatever its holder chose, so "the lowest
    id wins" let two fresh ids named to sort first outvote two honest peers, while how long a peer
    has been a member cannot be chosen. Stored times and member order: every replica agrees.
    """
    order = {p: i for i, p in enumerate(rnd.members)}
    commits = sorted(rnd.commits, key=lambda c: order.get(c[0], len(order)))
    counts = Counter(digest for _, digest in commits)
    seniority: dict[str, tuple[float, int]] = {}
    for i, (peer, digest) in enumerate(commits):
        rank = (joined_at(peer), i)
        seniority[digest] = min(seniority.get(digest, rank), rank)
    winner = min(counts, key=lambda d: (-counts[d], seniority[d]))
    donor = next(p for p, d in commits if d == winner)
    diverged = tuple(p for p, d in commits if d != winner)
    why = f"committed attempt {rnd.attempt}: {counts[winner]}/{len(rnd.members)} members agree on {winner[:12]}"
    if diverged:
        why += f"; diverged: {', '.join(diverged)} (resync from {donor})"
    if note:
        why += f"; {note}"
    known = dict(rnd.refused)
    flagged = {p: w for p, w in against(rnd).items() if p not in known} if config.norm_bound > 0 else {}
    if flagged:
        why += "; " + "; ".join(f"{p}: {w}" for p, w in sorted(flagged.items()))
    return replace(
        rnd,
        refused=rnd.refused + tuple(sorted(flagged.items())),
        phase="committed",
        committed_hash=winner,
        donor=donor,
        diverged=diverged,
        finished_at=now,
        reasons=rnd.reasons + (why,),
    )


def _maybe_start(rnd: Round, now: float, live: AbstractSet[str], config: CoordinatorConfig,
                 quarantined: Mapping[str, str]) -> Round:
    # `_settle` removed departed peers, so arrived peers are live; compare sizes before sets.
    arrived = rnd.arrived if len(rnd.arrived) <= len(live) else tuple(p for p in rnd.arrived if p in live)
    everyone = bool(live) and len(arrived) >= len(live) and live.issubset(arrived)
    deadline_passed = rnd.barrier_deadline is not None and now >= rnd.barrier_deadline
    # The quorum counts only once the previous round finished (the barrier clock runs): its members cannot arrive
    # before that, so an early quorum would be the stragglers of the previous round. Reached, it moves the
    # deadline to the end of its grace: a share of the time the quorum took.
    if (not everyone and not rnd.quorum_at and rnd.barrier_deadline is not None and config.quorum < 1
            and len(arrived) >= max(1, math.ceil(config.quorum * len(live) - 1e-9))):
        clock_started = rnd.barrier_deadline - config.rendezvous_timeout_s
        grace = config.quorum_grace * max(0.0, now - clock_started)
        rnd = replace(rnd, quorum_at=now, barrier_deadline=min(rnd.barrier_deadline, now + grace))
        deadline_passed = now >= rnd.barrier_deadline
    if not (everyone or deadline_passed):
        return rnd
    if len(arrived) < config.min_peers:
        if not deadline_passed:
            return rnd
        why = f"barrier extended: {len(arrived)} arrived, min_peers={config.min_peers}"
        repeated = bool(rnd.reasons) and rnd.reasons[-1] == why
        return replace(
            rnd,
            barrier_deadline=now + config.rendezvous_timeout_s,
            reasons=rnd.reasons if repeated else rnd.reasons + (why,),
        )
    members = tuple(sorted(arrived))
    refused = _refusals(rnd, members, quarantined, config)
    if refused:
        members = tuple(p for p in members if p not in refused)
        shown = "; ".join(f"{p}: {why}" for p, why in sorted(refused.items())[:8])
        rnd = replace(rnd, refused=tuple(sorted(refused.items())),
                      reasons=rnd.reasons + (f"refused {', '.join(sorted(refused))} ({shown})",))
        if not members:
            return _abort(rnd, now, "every arrived member was refused")
    if everyone:
        why = f"all {len(members)} live members arrived"
    else:
        missing = sorted(live.difference(arrived))
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        how = (f"quorum {config.quorum:g} reached and its grace of {now - rnd.quorum_at:.1f}s over" if rnd.quorum_at
               else "barrier deadline passed")
        why = f"{how} with {len(members)} of {len(live)} live members; missing: {shown}"
    return replace(
        rnd,
        phase="running",
        attempt=1,
        members=members,
        aggregate=config.aggregate,
        attempt_deadline=now + attempt_time_s(rnd, config),
        reasons=rnd.reasons + (f"attempt 1 with {len(members)} members: {why}",),
    )


def _refusals(rnd: Round, members: tuple[str, ...], quarantined: Mapping[str, str],
              config: CoordinatorConfig) -> dict[str, str]:
    """Who of the arrived `members` the round leaves out, and why (robust aggregation; nobody when off)."""
    if config.norm_bound <= 0:
        return {}
    out = {p: f"{QUARANTINED}{quarantined[p]}" for p in members if p in quarantined}
    declared = {p: n for p, n in rnd.norms if p in members and p not in out}
    if declared:  # a member that declared no norm among members that did hides its contribution's size
        out.update({p: "declared no contribution norm" for p in members if p not in declared and p not in out})
    out.update(out_of_bound(declared, config.norm_bound))
    return out


def _liars_refused(rnd: Round, excluded: frozenset[str]) -> Round:
    """Record as refused (towards a quarantine) each excluded member that two or more members caught sending a
    part above the norm it declared: one accuser alone could be lying itself."""
    accusers = Counter(s for _, s, why in rnd.accusations if s in excluded and why.startswith(OVER_DECLARED))
    known = dict(rnd.refused)
    liars = sorted(p for p, n in accusers.items() if n >= 2 and p not in known)
    if not liars:
        return rnd
    return replace(rnd, refused=rnd.refused + tuple((p, "sent more than the norm it declared") for p in liars))


def quarantined(state: RunState, stage: int, config: CoordinatorConfig) -> dict[str, str]:
    """Peers of `stage` refused (out of bound) in quarantine_after of its last quarantine_rounds rounds, and why."""
    if config.norm_bound <= 0:
        return {}
    latest = state.latest_round(stage)
    if latest is None:
        return {}
    counts: Counter[str] = Counter()
    for number in range(max(0, latest.number - config.quarantine_rounds), latest.number + 1):
        rnd = state.rounds.get((stage, number))
        if rnd is not None:
            counts.update(p for p, why in rnd.refused if not why.startswith(QUARANTINED))
    return {p: f"refused in {n} of the last {config.quarantine_rounds} rounds" for p, n in counts.items()
            if n >= config.quarantine_after}


def _settle(rnd: Round, now: float, live: AbstractSet[str], gone: frozenset[str], config: CoordinatorConfig,
            joined_at: Callable[[str], float], banned: Callable[[], Mapping[str, str]] = dict) -> Round:
    """Move an unfinished round as far as the state allows at `now`."""
    if rnd.finished:
        return rnd
    if rnd.phase == "gathering":
        if gone and gone.intersection(rnd.arrived):
            rnd = replace(rnd, arrived=tuple(p for p in rnd.arrived if p not in gone))
        return _maybe_start(rnd, now, live, config, banned() if config.norm_bound > 0 else {})
    # (Only when someone left: a barrier of N members would otherwise scan them all at each of its N commits.)
    lost = tuple(p for p in rnd.members if p in gone and rnd.commit_of(p) is None) if gone else ()
    if lost:
        survivors = tuple(p for p in rnd.members if p not in lost)
        return _next_attempt(rnd, now, survivors, f"lost {', '.join(lost)} (left or lease expired)", config)
    if rnd.accusations:
        verdict = _verdict(rnd, now, config)
        if verdict is not None:
            excluded, why = verdict
            survivors = tuple(p for p in rnd.members if p not in excluded)
            return _next_attempt(_liars_refused(rnd, excluded), now, survivors, why, config)
        return rnd  # commits wait for the verdict: the attempt may still be superseded
    if len(rnd.commits) == len(rnd.members):
        return _finalize(rnd, now, "", joined_at, config)
    if now >= rnd.attempt_deadline:
        if rnd.commits:
            late = [p for p in rnd.members if rnd.commit_of(p) is None]
            return _finalize(rnd, now, f"attempt deadline passed; no commit from {', '.join(late)}", joined_at,
                             config)
        return _abort(rnd, now, f"attempt {rnd.attempt} passed its deadline with no commit")
    return rnd


def _verdict(rnd: Round, now: float, config: CoordinatorConfig) -> tuple[frozenset[str], str] | None:
    """Who the failure reports exclude, or None while the verdict should wait.

    A member speaks by reporting or committing. The most-accused members are
    excluded, so two peers blaming a stalled third exclude it, not each other; a
    member accused by one member only, but alive (it spoke), goes with its accuser.
    A clear verdict comes once every member but the accused spoke, or when the
    report window closes; a tie waits for every member, up to the attempt
    deadline, then excludes all tied members.
    """
    # Reporters, committers and suspects are all members (`decisions` checks), so the silent members are
    # counted, not listed: a set of the attempt's N members at each of its reports cost O(N) per report.
    spoke = {r for r, _, _ in rnd.accusations} | {p for p, _ in rnd.commits}
    silent = len(rnd.members) - len(spoke)
    votes = Counter(s for _, s, _ in rnd.accusations)
    top = max(votes.values())
    excluded = frozenset(s for s, n in votes.items() if n == top)
    if len(excluded) == 1:
        # A clear verdict needs no word from the accused (it may be dead), only from the rest.
        if silent > len(excluded - spoke) and now < rnd.first_report_at + config.report_window_s:
            return None
    elif silent and now < rnd.attempt_deadline:
        # A tie (typically a stalled peer blaming the peer that blames it) waits for every
        # member to report or commit; dead members leave through lease expiry meanwhile.
        return None
    details = "; ".join(f"{r} reports {s}: {why}" for r, s, why in rnd.accusations[:6])
    names = ", ".join(sorted(excluded))
    why = f"failed: excluded {names} ({top} report{'s' if top > 1 else ''}): {details}"
    # One member's word against a member that is alive (it committed or reported) proves nothing about
    # which of the two failed (with gathered payloads, a commit does not prove delivery either): the
    # accuser goes too, so a liar cannot remove an honest peer without losing its own place.
    lone = frozenset(r for r, s, _ in rnd.accusations if s in excluded and s in spoke) if top == 1 else frozenset()
    if lone - excluded:
        why += f"; with its lone accuser {', '.join(sorted(lone - excluded))}, as {names} is alive"
    return excluded | lone, why


def settle_rounds(
    state: RunState,
    now: float,
    rounds: list[Round],
    config: CoordinatorConfig,
    gone: frozenset[str] = frozenset(),
) -> tuple[Round, ...]:
    """Settle `rounds` (possibly already changed) in stage/number order.

    When a round finishes, the barrier clock of the stage's next round starts.

    Args:
        state: the stored state; not modified.
        now: the current time in seconds.
        rounds: the rounds an event touched, in their new versions.
        config: the run's coordinator settings.
        gone: peers that are leaving in this decision (left or lease expired).
    Returns:
        Every round that differs from the stored state.
    """
    def joined_at(peer: str) -> float:  # a peer that left meanwhile counts as the newest
        member = state.members.get(peer)
        return member.joined_at if member is not None else math.inf

    pending = {r.key: r for r in rounds}
    for r in rounds:
        nxt = state.rounds.get((r.stage, r.number + 1))
        if nxt is not None and nxt.key not in pending:
            pending[nxt.key] = nxt
    live_by_stage: dict[int, AbstractSet[str]] = {}
    out: dict[tuple[int, int], Round] = {}
    for key in sorted(pending):
        rnd = out.get(key, pending[key])
        if rnd.stage not in live_by_stage:
            ids = state.stage_ids(rnd.stage)
            live_by_stage[rnd.stage] = ids - gone if gone else ids  # no copy on the hot path
        was_finished = rnd.finished
        banned = functools.partial(quarantined, state, rnd.stage, config)
        rnd = _settle(rnd, now, live_by_stage[rnd.stage], gone, config, joined_at, banned)
        out[key] = rnd
        if rnd.finished and not was_finished:
            nxt_key = (rnd.stage, rnd.number + 1)
            nxt = out.get(nxt_key, pending.get(nxt_key, state.rounds.get(nxt_key)))
            if nxt is None or nxt.phase != "gathering":
                continue
            before = nxt
            if rnd.phase == "committed":
                # Who arrived for the next round while this one ran holds an older state (members of
                # this one could not arrive yet): it must resync to this round's before it takes part.
                holders = {p for p, d in rnd.commits if d == rnd.committed_hash}
                if not holders.issuperset(nxt.arrived):
                    nxt = replace(nxt, arrived=tuple(p for p in nxt.arrived if p in holders))
            if nxt.barrier_deadline is None:
                nxt = replace(nxt, barrier_deadline=now + config.rendezvous_timeout_s)
            if nxt is not before:
                out[nxt_key] = _settle(nxt, now, live_by_stage[rnd.stage], gone, config, joined_at, banned)
    # Each round that finishes compacts the one KEEP_ROUNDS before it: constant work per round, bounded memory.
    for rnd in [r for k, r in out.items() if r.finished and not getattr(state.rounds.get(k), "finished", False)]:
        key = (rnd.stage, rnd.number - max(KEEP_ROUNDS, config.quarantine_rounds + 2))
        old = out.get(key, state.rounds.get(key))
        last = state.last_committed(rnd.stage)
        if old is not None and old.finished and (last is None or last.key != key):  # (its holders are donors)
            out[key] = compact(old)
    return tuple(r for k, r in sorted(out.items()) if state.rounds.get(k) != r)


KEEP_ROUNDS = 64
"""Rounds of a stage held whole behind its latest finished one; older ones are compacted (`compact`)."""


def compact(rnd: Round) -> Round:
    """A finished round as it is kept once it is old: its outcome (hash, donor, when, checkpoints, reasons), not its
    per-member lists. Those grow with the run's size (at 10,000 members about 2 MB a round, more with directions),
    and nothing reads them once the round is past the quarantine window and no longer the stage's last commit."""
    return replace(rnd, arrived=(), members=(), commits=(), accusations=(), diverged=(), norms=(), refused=(),
                   directions=())


def round_reasons(rounds: tuple[Round, ...], before: RunState) -> str:
    """The reasons `rounds` gained over their versions in `before`, joined for the decision log."""
    parts = []
    for r in rounds:
        old = before.rounds.get(r.key)
        new_reasons = (
            r.reasons[len(old.reasons) :] if old is not None and len(old.reasons) <= len(r.reasons) else r.reasons
        )
        parts += [f"stage {r.stage} round {r.number}: {why}" for why in new_reasons]
    return "; ".join(parts)


def _live(state: RunState, rnd: Round, peer_id: str) -> Member | None:
    """The live member `peer_id` if it holds `rnd`'s committed state: the process that committed in it, or one that
    joined since bringing that state (a checkpoint of it). One that joined again since with another state (resumed
    from an older checkpoint, say) holds only what it brought, not what its predecessor did."""
    member = state.members.get(peer_id)
    if member is None or not (member.joined_at <= rnd.finished_at or member.joined_with == rnd.committed_hash):
        return None
    return member


def _live_donor(state: RunState, rnd: Round) -> Member | None:
    """The first member, in member order, that committed the winning hash and is still live."""
    # `rnd.donor` is that member at commit time (rounds._finalize); while it is live, skip the
    # O(N log N) search, which every one of the N CommitRound replies would otherwise repeat.
    donor = _live(state, rnd, rnd.donor)
    if donor is not None:
        return donor
    order = {p: i for i, p in enumerate(rnd.members)}
    holders = sorted((p for p, d in rnd.commits if d == rnd.committed_hash), key=lambda p: order.get(p, len(order)))
    return next((m for p in holders if (m := _live(state, rnd, p)) is not None), None)


def holder_of(state: RunState, rnd: Round, peer_id: str) -> Member | None:
    """A live member other than `peer_id` that committed `rnd`'s winning hash, one others can dial first."""
    donor = _live_donor(state, rnd)
    if donor is not None and donor.peer_id != peer_id and donor.reachable:
        return donor
    holders = [m for p, d in rnd.commits
               if d == rnd.committed_hash and p != peer_id and (m := _live(state, rnd, p)) is not None]
    # A holder others can dial first: a state download is dialed by the one who needs it.
    holders.sort(key=lambda m: not m.reachable)
    return holders[0] if holders else (donor if donor is not None and donor.peer_id != peer_id else None)


def donor_for(state: RunState, stage: int, peer_id: str) -> Member | None:
    """A live member other than `peer_id` that holds the last committed state of `stage`, if any."""
    last = state.last_committed(stage)
    return holder_of(state, last, peer_id) if last is not None else None


def behind(state: RunState, stage: int, peer_id: str, state_hash: str) -> tuple[Round, Member] | None:
    """The last committed round and a donor of it, when a peer holding `state_hash` must resync first.

    It must when the stage committed a round whose state it does not hold and a live member other
    than itself holds that state. With no such member (every holder gone, or a stage rebuilt by
    recovery) whatever the peers hold is what the run goes on from: None. "" is not checked.
    """
    if not state_hash:
        return None
    last = state.last_committed(stage)
    if last is None or last.committed_hash == state_hash:
        return None
    donor = holder_of(state, last, peer_id)
    return (last, donor) if donor is not None else None


def next_round(state: RunState, stage: int) -> int:
    """The round of `stage` a peer should rendezvous for now."""
    latest = state.latest_round(stage)
    if latest is None:
        return 0
    return latest.number if latest.phase == "gathering" else latest.number + 1


def recover(state: RunState, now: float, config: CoordinatorConfig) -> Decision:
    """After a coordinator restart: renew every lease and give open rounds time to reconnect.

    The coordinator's downtime is not the peers' fault: every member gets a
    full lease from `now`, and open barriers and attempts at least as long,
    so peers that kept running simply re-attach with their next call.
    """
    lease = config.pace(len(state.members))[1]
    members = tuple(
        replace(m, lease_expires_at=now + lease)
        for m in state.members.values()
        if m.lease_expires_at < now + lease
    )
    rounds = []
    for r in state.rounds.values():
        if r.phase == "running" and r.attempt_deadline < now + lease:
            rounds.append(replace(r, attempt_deadline=now + lease))
        elif r.phase == "gathering" and r.barrier_deadline is not None and r.barrier_deadline < now + lease:
            rounds.append(replace(r, barrier_deadline=now + lease))
    if not state.members and not state.rounds:
        return NO_CHANGE
    committed = sorted((r.stage, r.number) for r in state.rounds.values() if r.phase == "committed")
    return Decision(
        reason=(
            f"recovered {len(state.members)} members and {len(state.rounds)} rounds "
            f"({len(committed)} committed); leases renewed for {lease:g}s"
        ),
        put_members=members,
        put_rounds=tuple(rounds),
    )
