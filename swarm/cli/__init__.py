"""Command-line interface: `swarm coordinator | status | local`."""
