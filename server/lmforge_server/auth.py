"""API keys: `authorization: Bearer <key>` metadata to the tenant and scopes it grants.

Keys come from settings (`LMFORGE_API_KEYS`, `key:tenant[:scopes]` items separated by
commas, scopes joined by `+`) and from a key file (`LMFORGE_API_KEYS_FILE`, one
`key:tenant[:scopes]` per line, scopes separated by `,` or `+`, `#` comments). A key
without scopes has all of them. Transport-neutral: the gRPC interceptor and tests share it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lmforge_server import errors

DEFAULT_OWNER = "default"
SCOPES = frozenset({"read", "train", "infer"})
# Never a ':' or '/': tenants name Redis keys and directories.
TENANT_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
# The caller sent no API key or an unknown one (gRPC: UNAUTHENTICATED).
AuthError = errors.Unauthenticated


class KeyConfigError(ValueError):
    """A malformed key entry (the server refuses to start)."""


@dataclass(frozen=True)
class Principal:
    tenant: str
    scopes: frozenset[str]


def parse_entry(entry: str, where: str) -> tuple[str, Principal]:
    """ "key:tenant[:scopes]" -> (key, Principal); raises KeyConfigError naming `where`."""
    key, _, rest = entry.strip().partition(":")
    tenant, _, raw_scopes = rest.partition(":")
    tenant = tenant or DEFAULT_OWNER
    if not key:
        raise KeyConfigError(f"{where}: empty API key")
    if not TENANT_RE.match(tenant):
        raise KeyConfigError(
            f"{where}: tenant {tenant[:70]!r} must be 1-64 letters, digits, '.', '_' or '-'"
            " and start with a letter or digit"
        )
    scopes = frozenset(filter(None, re.split(r"[+, ]+", raw_scopes))) or SCOPES
    unknown = sorted(scopes - SCOPES)
    if unknown:
        raise KeyConfigError(f"{where}: unknown scopes {unknown}; scopes are {sorted(SCOPES)}")
    return key, Principal(tenant, scopes)


def read_key_file(path: Path | str) -> dict[str, Principal]:
    keys = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            key, principal = parse_entry(line, f"{path}:{n}")
            keys[key] = principal
    return keys


class Keyring:
    """The server's API keys; empty means authentication is off (every caller is
    tenant "default" with all scopes)."""

    def __init__(self, keys: dict[str, Principal]):
        # Looked up by the key's SHA-256, compared in constant time: neither the lookup nor
        # the comparison reveals how much of a guessed key was right.
        self._by_digest = {hashlib.sha256(k.encode()).digest(): p for k, p in keys.items()}

    @classmethod
    def from_settings(cls, settings) -> Keyring:
        keys = {}
        for key, value in settings.api_keys.items():
            k, principal = parse_entry(f"{key}:{value}", "LMFORGE_API_KEYS")
            keys[k] = principal
        if settings.api_keys_file:
            keys.update(read_key_file(settings.api_keys_file))
        return cls(keys)

    def __bool__(self) -> bool:
        return bool(self._by_digest)

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        """The caller's principal; raises errors.Unauthenticated for a missing or unknown key."""
        if not self._by_digest:
            return Principal(DEFAULT_OWNER, SCOPES)
        header = None
        for key, value in metadata or ():
            if key.lower() == "authorization":
                header = value.decode(errors="replace") if isinstance(value, bytes) else value
                break
        if header is None:
            raise errors.Unauthenticated(
                "missing authorization metadata: send 'authorization: Bearer <api key>'"
            )
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise errors.Unauthenticated("authorization metadata must be 'Bearer <api key>'")
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for known, principal in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                found = principal
        if found is None:
            raise errors.Unauthenticated("unknown API key")
        return found


def owner_from_metadata(
    metadata: Iterable[tuple[str, str | bytes]] | None, api_keys: dict[str, str]
) -> str:
    """The tenant of the request's API key ("default" when `api_keys` is empty)."""
    keys = dict(parse_entry(f"{k}:{v}", "api_keys") for k, v in api_keys.items())
    return Keyring(keys).authenticate(metadata).tenant
