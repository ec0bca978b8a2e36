"""`swarm keys`: the run's CA and one certificate per party, for a coordinator and peers on the internet."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from swarm.security import CA_TTL, CERT_TTL, COORDINATOR, init_ca, issue, parse_ttl
from swarm.security.revocation import revoke

DEFAULT_DIR = "swarm-keys"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "keys",
        help="create the run's CA and issue certificates (for --tls-dir)",
        description=(
            "Identity for a run over the internet. `swarm keys init` creates the run's CA (ca.crt, and ca.key "
            "which signs certificates: keep it private); `swarm keys issue NAME` a certificate and key for the "
            f"coordinator (NAME `{COORDINATOR}`) or a peer (NAME = its --peer-id). The coordinator serves with "
            "`--tls-dir DIR` holding ca.crt and coordinator.crt/.key; a peer joins with `--tls-dir DIR` holding "
            "ca.crt and its own NAME.crt/.key. Keys are written 0600; nothing is overwritten without --force."
        ),
        epilog=(f"example: swarm keys init --run-id run1 && swarm keys issue {COORDINATOR} && swarm keys issue "
                f"alice  (then copy {DEFAULT_DIR}/ca.crt, alice.crt and alice.key to alice's --tls-dir)"),
    )
    sub2 = p.add_subparsers(dest="keys_command", required=True, metavar="{init,issue,revoke}")

    init = sub2.add_parser("init", help="create the run's CA",
                           description="Create the run's CA in --dir: ca.key (0600; it signs certificates, keep it "
                                       "private) and ca.crt (give it to every party). The folder is created 0700.")
    init.add_argument("--dir", default=DEFAULT_DIR, help="folder of the run's keys (default: %(default)s)")
    init.add_argument("--run-id", default="default",
                      help="the run this CA is for; the coordinator's and peers' --run-id must match "
                           "(default: %(default)s)")
    init.add_argument("--ttl", default=f"{CA_TTL.days}d",
                      help="how long the CA is valid, e.g. 365d; no certificate outlives it (default: %(default)s)")
    init.add_argument("--force", action="store_true",
                      help="replace an existing CA: every certificate the old one issued stops being accepted")
    init.set_defaults(run=_init)

    iss = sub2.add_parser("issue", help="issue a certificate for the coordinator or a peer",
                          description="Issue NAME.key (0600) and NAME.crt in --dir, signed by the run's CA there. "
                                      f"NAME is `{COORDINATOR}` for the coordinator, else a peer's --peer-id: the "
                                      "coordinator lets the certificate act only as that peer.")
    iss.add_argument("name", metavar="NAME", help=f"`{COORDINATOR}`, or a peer id")
    iss.add_argument("--dir", default=DEFAULT_DIR, help="folder of the run's CA (default: %(default)s)")
    iss.add_argument("--ttl", default=f"{CERT_TTL.days}d",
                     help="how long the certificate is valid: 30d, 24h, 90m (default: %(default)s)")
    iss.add_argument("--force", action="store_true", help="replace an existing certificate and key of that name")
    iss.set_defaults(run=_issue)

    rev = sub2.add_parser(
        "revoke", help="revoke a certificate (a leaked key): both planes refuse it from then on",
        description="Add a certificate to the run's revocation list, --dir/crl.pem, signed by the CA. The "
                    "coordinator (its --tls-dir must be this folder, or hold a copy of crl.pem) reads the list "
                    "again within a second and refuses every call made with the certificate; it hands the "
                    "list to the peers, which refuse the certificate on the data plane within a heartbeat. "
                    "Issue the name again (issue --force) to give its owner a new key.")
    rev.add_argument("name", metavar="NAME", nargs="?", help="whose certificate: NAME.crt in --dir")
    rev.add_argument("--serial", help="the certificate's serial number in hex (`openssl x509 -noout -serial`), "
                                      "for one whose file is not in --dir (issued by a join token, say)")
    rev.add_argument("--dir", default=DEFAULT_DIR, help="folder of the run's CA (default: %(default)s)")
    rev.set_defaults(run=_revoke)


def _init(args: argparse.Namespace) -> int:
    try:
        crt = init_ca(args.dir, args.run_id, ttl=parse_ttl(args.ttl), force=args.force)
    except (ValueError, OSError) as e:
        return _fail(e)
    folder = Path(args.dir)
    print(f"created the CA of run {args.run_id!r}: {crt} (give it to every party) and {folder / 'ca.key'} "
          "(keep it private: it signs certificates)")
    print(f"next: swarm keys issue {COORDINATOR} --dir {folder}, then swarm keys issue PEER_ID --dir {folder} "
          "for each peer")
    return 0


def _issue(args: argparse.Namespace) -> int:
    try:
        key, crt = issue(args.dir, args.name, parse_ttl(args.ttl), force=args.force)
    except (ValueError, OSError) as e:
        return _fail(e)
    folder = Path(args.dir)
    print(f"issued {args.name!r} for {args.ttl}: {crt} and {key} (0600)")
    where = "the coordinator's" if args.name == COORDINATOR else f"peer {args.name}'s"
    print(f"copy {folder / 'ca.crt'}, {crt.name} and {key.name} into {where} --tls-dir (never ca.key)")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    try:
        serial = int(args.serial.removeprefix("serial=").removeprefix("0x"), 16) if args.serial else None
        crl, revoked = revoke(args.dir, args.name, serial)
    except (ValueError, OSError) as e:
        return _fail(e)
    who = f"{args.name}'s certificate" if args.name else "the certificate"
    print(f"revoked {who} (serial {revoked:x}) in {crl}; a coordinator whose --tls-dir holds it refuses it within "
          "a second, its peers within a heartbeat")
    return 0


def _fail(e: Exception) -> int:
    print(f"swarm keys: {e}", file=sys.stderr)
    return 2
