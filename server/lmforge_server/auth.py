"""API keys: `authorization: Bearer <key>` metadata to the owner (tenant) it belongs to.

Transport-neutral: takes the metadata pairs, so the gRPC servers and tests share it.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

DEFAULT_OWNER = "default"


class AuthError(Exception):
    """The caller sent no API key or an unknown one (gRPC: UNAUTHENTICATED)."""


def owner_from_metadata(
    metadata: Iterable[tuple[str, str | bytes]] | None, api_keys: dict[str, str]
) -> str:
    """The owner of the request's API key; "default" when authentication is off.

    `api_keys` maps key -> owner (Settings.api_keys). Raises AuthError when keys are
    configured and the `authorization` header is missing, malformed or unknown.
    """
    if not api_keys:
        return DEFAULT_OWNER
    header = None
    for key, value in metadata or ():
        if key.lower() == "authorization":
            header = value.decode() if isinstance(value, bytes) else value
            break
    if header is None:
        raise AuthError("missing authorization metadata: send 'authorization: Bearer <api key>'")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError("authorization metadata must be 'Bearer <api key>'")
    # Compare against every key in constant time, so timing does not reveal a prefix.
    owner = None
    for key, tenant in api_keys.items():
        if hmac.compare_digest(key.encode(), token.encode()):
            owner = tenant
    if owner is None:
        raise AuthError("unknown API key")
    return owner
