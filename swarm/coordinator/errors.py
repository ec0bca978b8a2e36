"""Typed domain errors of the coordinator.

Decisions raise these; the gRPC servicer maps each to one status code in one
place (`service._STATUS`). Every message says what was wrong and what to do.
A decision that raises changes nothing: errors are raised before any change
is produced.
"""

from __future__ import annotations

PROTOCOL_VERSION = 1
"""Version of protos/swarm/v1; peers must send exactly this in Join."""


class CoordinatorError(Exception):
    """Base of every error a request can get from the coordinator."""


class InvalidRequest(CoordinatorError):
    """A field is malformed, out of range or not finite."""


class ProtocolMismatch(CoordinatorError):
    """The peer speaks another protocol version."""


class UnknownRun(CoordinatorError):
    """The request names a run this coordinator does not serve."""


class UnknownPeer(CoordinatorError):
    """The peer id is not a member of the run."""


class LeaseExpired(CoordinatorError):
    """The peer was a member but missed heartbeats for `lease_s` and was dropped."""


class DuplicatePeer(CoordinatorError):
    """Another live process already holds this peer id."""


class RoundNotReady(CoordinatorError):
    """The request needs a round state the round is not in (e.g. commit before start)."""


class RoundAhead(CoordinatorError):
    """The request names a round beyond the next one of its stage."""
