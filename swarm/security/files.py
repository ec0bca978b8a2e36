"""Where a run's keys and certificates live, and how they are written and read safely.

One folder holds a run's credentials: `ca.crt` (the run CA's certificate, given to everyone),
`ca.key` (the CA's private key: only where certificates are issued), and `NAME.crt` / `NAME.key`
per identity (`coordinator`, each peer id). Keys are written 0600 from the first byte (created with
that mode, never chmod-ed after), and never replace an existing file unless asked to.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from swarm.security.errors import CredentialExists, MissingCredential, UnsafeKeyFile

CA_NAME = "ca"
"""File stem of the run CA: ca.crt, ca.key. No identity may use it."""
COORDINATOR = "coordinator"
"""The coordinator's certificate name; clients check the coordinator's certificate against it, whatever
address they dial."""

_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")
"""An identity: a peer id (protocol: [A-Za-z0-9._-]), at most 64 characters (an X.509 common name),
not starting with a dot (no hidden files, no `..`)."""


def check_name(name: str) -> str:
    """`name` if it can name an identity (a peer id, or `coordinator`).

    Raises:
        ValueError: not [A-Za-z0-9._-], longer than 64, starting with a dot, or the CA's own name.
    """
    if not _NAME.match(name) or name == CA_NAME:
        raise ValueError(f"name {name!r} cannot name a certificate: use 1-64 of A-Z a-z 0-9 . _ - (not starting "
                         f"with a dot), and not {CA_NAME!r}; a peer's name is its --peer-id")
    return name


def cert_path(folder: str | Path, name: str) -> Path:
    return Path(folder) / f"{name}.crt"


def key_path(folder: str | Path, name: str) -> Path:
    return Path(folder) / f"{name}.key"


def refuse_overwrite(paths: list[Path]) -> None:
    """Raise if any of `paths` exists (checked for all before anything is written).

    Raises:
        CredentialExists: names the file and --force.
    """
    for path in paths:
        if path.exists():
            raise CredentialExists(f"{path} exists; pass --force to replace it")


def write_file(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Write `data` to `path` with permissions `mode` from creation on.

    Without `force` the file is created exclusively (O_EXCL: an existing file is never touched); with it,
    a temporary file in the same folder replaces `path` atomically.

    Raises:
        CredentialExists: `path` exists and not `force`.
        OSError: the folder cannot be written.
    """
    target = path.with_name(f".{path.name}.{os.getpid()}.tmp") if force else path
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise CredentialExists(f"{path} exists; pass --force to replace it") from None
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits off a certificate's 0644; a key's 0600 is exact
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        target.unlink(missing_ok=True)
        raise
    os.close(fd)
    if force:
        os.replace(target, path)


def read_file(path: Path, how_to_make: str) -> bytes:
    """The bytes of a credential file.

    Raises:
        MissingCredential: it does not exist; the message says `how_to_make` it.
        OSError: it exists but cannot be read.
    """
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise MissingCredential(f"missing {path}: {how_to_make}") from None
    except IsADirectoryError:
        raise MissingCredential(f"{path} is a folder, not a file: {how_to_make}") from None


def read_key(path: Path, how_to_make: str) -> bytes:
    """The bytes of a private key file, refused when its permissions let anyone but the owner read it.

    Raises:
        MissingCredential: it does not exist.
        UnsafeKeyFile: group or others may read or write it; the message says which chmod fixes it.
    """
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        raise MissingCredential(f"missing {path}: {how_to_make}") from None
    if mode & 0o077:
        raise UnsafeKeyFile(f"{path} is a private key others can read (mode {mode:04o}); "
                            f"run `chmod 600 {path}` and keep it only on the machine that uses it")
    return read_file(path, how_to_make)
