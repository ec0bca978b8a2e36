"""`swarm` command line: parse, build, run, close (STYLE 5)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any

_importing = True


def _terminate_early(signum: int, frame: object) -> None:
    # Until a command installs its own handlers, SIGTERM ends the process as an exception, so
    # cleanup code runs and nothing prints a traceback (the `train` task reports on it). During the
    # imports below it exits at once instead, with nothing to clean up: a SystemExit raised inside
    # an import was swallowed there (numpy's extension module, seen) and the peer went on to join.
    if _importing:
        os._exit(128 + signum)
    raise SystemExit(128 + signum)


signal.signal(signal.SIGTERM, _terminate_early)

import importlib

_importing = False

LIGHT = {"coordinator": "swarm.cli.coordinator_cmd", "relay": "swarm.cli.relay_cmd",
         "status": "swarm.cli.status_cmd", "keys": "swarm.cli.keys_cmd", "token": "swarm.cli.token_cmd"}
"""Commands that need no torch: run alone, only their own module is imported (a coordinator or relay process
then holds about a quarter of the memory)."""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm",
        description="Fault-tolerant decentralized training over the internet.",
        epilog="Run `swarm COMMAND --help` for the options of each command.",
    )
    parser.add_argument("--log-level", default=os.environ.get("SWARM_LOG_LEVEL", "WARNING"),
                        help="logging level for stderr (default: %(default)s; env SWARM_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if only is not None:
        importlib.import_module(LIGHT[only]).add_parser(sub)
        return parser
    from swarm.cli import coordinator_cmd, export_cmd, keys_cmd, local_cmd, relay_cmd, status_cmd, token_cmd
    for module in (coordinator_cmd, *_installed_commands(), relay_cmd, status_cmd, local_cmd, export_cmd, keys_cmd,
                   token_cmd):
        module.add_parser(sub)
    return parser


def _command(argv: list[str]) -> str | None:
    """The light command `argv` runs, if it is one (the first word that is not an option or its value)."""
    words = iter(argv)
    for word in words:
        if word == "--log-level":
            next(words, None)
        elif not word.startswith("-"):
            return word if word in LIGHT else None
    return None


def _installed_commands() -> list[Any]:
    """Command modules registered under the `swarm.commands` entry point: `swarm peer` (the daemon in
    swarm.peers, which builds on this library; the library never imports it)."""
    from importlib.metadata import entry_points

    found = [importlib.import_module(ep.value) for ep in sorted(entry_points(group="swarm.commands"),
                                                               key=lambda ep: ep.name)]
    return found or [_MissingPeer]


class _MissingPeer:
    """`swarm peer` when the daemon's entry point is not installed: say how to install it."""

    @staticmethod
    def add_parser(sub: argparse._SubParsersAction) -> None:
        p = sub.add_parser("peer", help="join a run (not installed: see `swarm peer`)", add_help=False)
        p.add_argument("ignored", nargs=argparse.REMAINDER)
        p.set_defaults(run=lambda args: _missing(args))


def _missing(_: argparse.Namespace) -> int:
    print("swarm peer: the peer daemon (swarm.peers) is not registered; reinstall the project "
          "(`pip install -e .` or `make setup`)", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `swarm` console script; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_command(argv)).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
