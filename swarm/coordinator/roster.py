"""Member lists sent as changes: a barrier of N members costs O(churn) bytes per reply, not O(N).

Every member of an attempt needs its ordered member list. Sent whole, a round's release costs N replies of
N members (~65 bytes each: 6.5 GB at 10,000 peers). Between two rounds the list barely changes, so a peer
names the list it holds (`RendezvousRequest.known_roster`, the digest of its last one) and the coordinator
answers with the difference (`Attempt.base_roster`, the added or changed `members`, the `removed` ids). The
list is always sorted by peer id (attempts start with the arrived peers sorted; later attempts keep the
survivors in order), so the difference rebuilds it; the caller checks the digest and asks for the whole list
when anything does not match.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Sequence

from swarm.proto.v1 import coordinator_pb2 as pb

KEEP = 8
"""Member lists the coordinator remembers (each attempt's, newest first): a peer that skipped more rounds
than this gets the whole list."""


class RosterMismatch(ValueError):
    """A member list sent as changes does not rebuild into the list its digest names."""


def digest(members: Sequence[pb.Member]) -> str:
    """The digest of an ordered member list (ids, addresses, capabilities: everything a member reads)."""
    return _digest([m.SerializeToString(deterministic=True) for m in members])


def _digest(encoded: Sequence[bytes]) -> str:
    h = hashlib.sha256()
    for data in encoded:
        h.update(len(data).to_bytes(4, "little"))
        h.update(data)
    return h.hexdigest()[:32]


class Rosters:
    """The coordinator's side: the recent member lists, and replies that send a caller only the changes."""

    def __init__(self, keep: int = KEEP) -> None:
        self._keep = keep
        self._lists: OrderedDict[str, dict[str, bytes]] = OrderedDict()
        self._replies: dict[tuple[int, str], tuple[pb.RendezvousReply, pb.RendezvousReply]] = {}

    def remember(self, members: Sequence[pb.Member]) -> str:
        """Keep `members` (an attempt's list) and return its digest; "" when it is not sorted by peer id (it
        cannot be sent as changes then)."""
        ids = [m.peer_id for m in members]
        if any(a >= b for a, b in itertools.pairwise(ids)):
            return ""
        encoded = [m.SerializeToString(deterministic=True) for m in members]  # (once: the digest and the list)
        key = _digest(encoded)
        if key not in self._lists:
            self._lists[key] = dict(zip(ids, encoded, strict=True))
            while len(self._lists) > self._keep:
                self._lists.popitem(last=False)
                self._replies.clear()
        return key

    def for_caller(self, reply: pb.RendezvousReply, known: str) -> pb.RendezvousReply:
        """`reply` (a STARTED reply with the whole list) as the caller holding list `known` should get it."""
        current = reply.attempt.roster
        base = self._lists.get(known) if known else None
        now = self._lists.get(current) if current else None
        if base is None or now is None:
            return reply
        hit = self._replies.get((id(reply), known))
        if hit is not None and hit[0] is reply:
            return hit[1]
        out = pb.RendezvousReply()
        out.CopyFrom(reply)
        del out.attempt.members[:]
        out.attempt.members.extend(m for m in reply.attempt.members if base.get(m.peer_id) != now[m.peer_id])
        out.attempt.removed.extend(p for p in base if p not in now)
        out.attempt.base_roster = known
        if len(self._replies) > 4 * self._keep:
            self._replies.clear()
        self._replies[(id(reply), known)] = (reply, out)
        return out


class Roster:
    """A peer's side: the last member list it got, and the rebuilding of a list sent as changes."""

    def __init__(self) -> None:
        self.digest = ""
        self._members: dict[str, pb.Member] = {}

    def adopt(self, attempt: pb.Attempt) -> None:
        """Make `attempt.members` the whole list (rebuilt from the changes it carries) and remember it.

        Raises:
            RosterMismatch: the changes are against a list this peer does not hold, or do not rebuild into the
                list the digest names; `attempt` is unchanged: ask for the whole list.
        """
        if attempt.base_roster:
            if attempt.base_roster != self.digest:
                raise RosterMismatch(f"changes against member list {attempt.base_roster[:12]}, this peer holds "
                                     f"{self.digest[:12] or 'none'}")
            merged = dict(self._members)
            for peer_id in attempt.removed:
                merged.pop(peer_id, None)
            merged.update((m.peer_id, _copy(m)) for m in attempt.members)
            members = [merged[p] for p in sorted(merged)]
        else:
            members = [_copy(m) for m in attempt.members]
        if attempt.roster and digest(members) != attempt.roster:
            raise RosterMismatch(f"the member list does not match its digest {attempt.roster[:12]}")
        if attempt.base_roster:
            del attempt.members[:]
            attempt.members.extend(members)
            del attempt.removed[:]
            attempt.base_roster = ""
        self.digest = attempt.roster
        self._members = {m.peer_id: m for m in members}


def _copy(member: pb.Member) -> pb.Member:
    """A member of its own (kept past the reply it came in, which may be changed)."""
    out = pb.Member()
    out.CopyFrom(member)
    return out
