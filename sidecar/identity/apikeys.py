"""API keys: a file of key hashes mapped to tenants, and the helpers that write entries for it.

The file holds ``sha256(key)`` in hex, never a key, so reading it (or a backup of it) gives
nobody a usable credential. Lookup is a hash plus a dict access: a few microseconds.

File format (YAML or JSON; quote the hashes in YAML)::

    "3f1c...e9": {tenant: acme, tier: gold, scopes: [completions, embeddings], name: ci-bot}
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from sidecar.identity.model import Identity
from sidecar.identity.watched_file import CredentialFileError

_HASH = re.compile(r"[0-9a-f]{64}")
_ENTRY_FIELDS = frozenset({"tenant", "tier", "scopes", "name"})
# Longer values are refused before hashing (Envoy allows header values of tens of KiB).
MAX_API_KEY_LENGTH = 512


def hash_api_key(key: str) -> str:
    """The form in which a key is stored and looked up: sha256 of its UTF-8 bytes, in hex."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def make_api_key_entry(
    tenant: str,
    *,
    tier: str | None = None,
    scopes: Iterable[str] = (),
    name: str | None = None,
    key: str | None = None,
) -> tuple[str, dict[str, dict[str, Any]]]:
    """A new key (random unless given) and its file entry ``{hash: {...}}``.

    The key is shown to its owner once; only the entry is written to the key file.
    """
    if key is None:
        key = "kg_" + secrets.token_urlsafe(32)
    if not key or "." in key or any(c.isspace() for c in key) or len(key) > MAX_API_KEY_LENGTH:
        # A dot would make "Bearer <key>" look like a JWT.
        raise ValueError("an API key must be 1-512 characters without dots or white space")
    entry = {"tenant": tenant, "tier": tier, "scopes": list(scopes), "name": name}
    _identity_from_entry(entry, where="new entry")
    return key, {hash_api_key(key): entry}


def parse_api_key_file(data: bytes) -> dict[str, Identity]:
    """Parse the key file into ``{sha256 hex: Identity}``; raises CredentialFileError."""
    doc = yaml.safe_load(data.decode("utf-8"))
    if doc is None:
        # An empty file is more likely a truncated write than "no keys"; ``{}`` says that.
        raise CredentialFileError("file is empty (write {} for no keys)")
    if not isinstance(doc, Mapping):
        raise CredentialFileError("top level must be a mapping of key hash to entry")
    keys: dict[str, Identity] = {}
    for index, (digest, entry) in enumerate(doc.items()):
        where = f"entry {index + 1}"
        if not isinstance(digest, str) or not _HASH.fullmatch(digest.lower()):
            raise CredentialFileError(f"{where}: key must be a quoted sha256 hex digest")
        keys[digest.lower()] = _identity_from_entry(entry, where)
    return keys


def _identity_from_entry(entry: Any, where: str) -> Identity:
    if not isinstance(entry, Mapping):
        raise CredentialFileError(f"{where}: must be a mapping")
    unknown = sorted(set(map(str, entry)) - _ENTRY_FIELDS)
    if unknown:
        raise CredentialFileError(f"{where}: unknown field {unknown[0]!r}")
    tenant = entry.get("tenant")
    if not isinstance(tenant, str) or not tenant:
        raise CredentialFileError(f"{where}: tenant must be a non-empty string")
    tier = entry.get("tier")
    if tier is not None and not isinstance(tier, str):
        raise CredentialFileError(f"{where}: tier must be a string")
    name = entry.get("name")
    if name is not None and not isinstance(name, str):
        raise CredentialFileError(f"{where}: name must be a string")
    scopes = entry.get("scopes") or []
    if isinstance(scopes, str):
        scopes = scopes.split()
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise CredentialFileError(f"{where}: scopes must be a list of strings")
    return Identity(authenticated=True, method="api_key", tenant=tenant, tier=tier,
                    scopes=tuple(scopes), subject=None, key_name=name)
