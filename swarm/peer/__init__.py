"""The peer as a library layer: the round protocol (`Peer`), its config and types, and `SwarmPeer`,
the blocking handle the training hooks talk to. The daemon behind `swarm peer` (`swarm.peers`) is
built on it; nothing here knows that daemon."""

from swarm.peer.handle import SwarmPeer
from swarm.peer.peer import Peer, PeerConfig
from swarm.peer.state import GENESIS_HASH, PeerReport, RoundState, StateLost, SyncOutcome, SyncResult

__all__ = ["GENESIS_HASH", "Peer", "PeerConfig", "PeerReport", "RoundState", "StateLost", "SwarmPeer", "SyncOutcome", "SyncResult"]
