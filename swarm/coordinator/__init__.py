"""Coordinator: membership, rendezvous, attempts and commits (the control plane)."""
