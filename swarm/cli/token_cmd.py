"""`swarm token`: join tokens, for peers whose people should not handle CA files (docs/security.md, "Join tokens")."""

from __future__ import annotations

import argparse
import sys

from swarm.cli.keys_cmd import DEFAULT_DIR
from swarm.security import parse_ttl
from swarm.security.issuer import Issuer
from swarm.security.tokens import REVOKED_FILE, revoke


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "token",
        help="create and revoke join tokens (a peer gets its certificate with --token)",
        description=(
            "Join tokens let a peer get its certificate from the coordinator: `swarm peer --token TOKEN "
            "--peer-id NAME --tls-dir DIR` makes its key, sends a certificate request with the token to the "
            "coordinator's --enroll-port and writes ca.crt and NAME.crt/.key into DIR. Run these commands where "
            "the run CA's ca.key is (--dir: the `swarm keys` folder, which the coordinator serving --enroll-port "
            "uses as its --tls-dir): the token is signed with a key derived from ca.key."
        ),
        epilog="example: swarm token create --ttl 24h --max-uses 3 --enroll coord.example.net:7071",
    )
    sub2 = p.add_subparsers(dest="token_command", required=True, metavar="{create,revoke}")

    create = sub2.add_parser("create", help="print a new join token",
                             description="Print a join token for the run of the CA in --dir: it admits up to "
                                         "--max-uses distinct peer ids until --ttl from now. It carries the run's "
                                         "ca.crt, so the peer needs no other file. Treat it as a password. Its "
                                         "id goes to stderr (for `swarm token revoke`).")
    create.add_argument("--dir", default=DEFAULT_DIR, help="folder of the run's CA (default: %(default)s)")
    create.add_argument("--ttl", default="24h", help="how long it can be used: 24h, 7d, 90m (default: %(default)s)")
    create.add_argument("--max-uses", type=int, default=1, help="distinct peer ids it may enroll (default: 1)")
    create.add_argument("--enroll", default="", metavar="HOST:PORT",
                        help="the coordinator's enrollment address (its --enroll-port), or :PORT for the "
                             "--coordinator host (default: the peer's --coordinator port + 1)")
    create.set_defaults(run=_create)

    rev = sub2.add_parser("revoke", help="stop a token from enrolling anyone",
                          description=f"Add TOKEN_ID to --dir/{REVOKED_FILE}; the coordinator reads that file at "
                                      "every enrollment, so it takes effect at once where the coordinator's "
                                      "--tls-dir is --dir (else copy the file there). Certificates already "
                                      "issued stay valid until they expire.")
    rev.add_argument("token_id", metavar="TOKEN_ID", help="the id `swarm token create` printed")
    rev.add_argument("--dir", default=DEFAULT_DIR, help="folder of the run's CA (default: %(default)s)")
    rev.set_defaults(run=_revoke)


def _create(args: argparse.Namespace) -> int:
    try:
        token, claims = Issuer.load(args.dir).create_token(parse_ttl(args.ttl), args.max_uses, enroll=args.enroll)
    except (ValueError, OSError) as e:
        return _fail(e)
    print(token)
    print(f"token {claims.token_id} for run {claims.run_id!r}: up to {claims.max_uses} peer(s) until "
          f"{claims.expires():%Y-%m-%d %H:%M:%S} UTC; revoke with `swarm token revoke {claims.token_id} --dir "
          f"{args.dir}`", file=sys.stderr)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    try:
        Issuer.load(args.dir)  # the CA's folder: a typo in --dir must not revoke into a folder nobody reads
        added = revoke(args.dir, args.token_id)
    except (ValueError, OSError) as e:
        return _fail(e)
    print(f"token {args.token_id} {'revoked' if added else 'was revoked already'} ({args.dir}/{REVOKED_FILE})")
    return 0


def _fail(e: Exception) -> int:
    print(f"swarm token: {e}", file=sys.stderr)
    return 2
