"""Fault-tolerant all-reduce among the members of a coordinator attempt."""
