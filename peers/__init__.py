"""The peer daemon behind `swarm peer` (installed as swarm.peers)."""
