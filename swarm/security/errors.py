"""What can be wrong with a key or certificate on disk; every message says which file and what to do."""

from __future__ import annotations


class CredentialError(ValueError):
    """A key or certificate cannot be used. A ValueError, so entry points that report bad settings as one
    line (exit 2) report these the same way."""


class MissingCredential(CredentialError):
    """A file the identity needs does not exist."""


class UnsafeKeyFile(CredentialError):
    """A private key file that others than its owner can read (or a key file that is not a key)."""


class ExpiredCredential(CredentialError):
    """A certificate outside its validity window: expired, or not valid yet."""


class ForeignCredential(CredentialError):
    """A certificate not signed by this run's CA (another run's, or forged), or a key that is not its own."""


class NameMismatch(CredentialError):
    """A certificate issued for another name than the one it is used as."""


class CredentialExists(CredentialError):
    """A key or certificate would be overwritten without `force`."""
