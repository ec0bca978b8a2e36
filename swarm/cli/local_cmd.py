"""`swarm local`: placeholder until written below."""
import argparse
def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("local", help="run a coordinator and N peers on this machine")
    p.set_defaults(run=lambda a: 0)
