"""The OPA server, reached through opa-python-client's async client.

One persistent aiohttp session (keep-alive pool) for every query; the client's own
retries are off because the Decider owns the deadline and the failure mode.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from opa_client.errors import PolicyNotFoundError
from opa_client.opa_async import AsyncOpaClient

from sidecar.config import OpaConfig


class OpaPolicyClient:
    in_process = False  # an HTTP call: the Decider bounds it with opa.timeout_s

    def __init__(self, config: OpaConfig):
        url = urlsplit(config.url)
        self._config = config
        self._package, _, self._rule = config.policy_path.strip("/").rpartition("/")
        self._client = AsyncOpaClient(
            host=url.hostname or "127.0.0.1",
            port=url.port or (443 if url.scheme == "https" else 8181),
            ssl=url.scheme == "https",
            retries=0,
            timeout=max(config.timeout_s * 4, 1.0),
        )
        self._started = False

    async def _session(self) -> AsyncOpaClient:
        if not self._started:
            await self._client.__aenter__()
            self._started = True
        return self._client

    async def evaluate(self, document: Mapping[str, Any]) -> Any:
        client = await self._session()
        response = await client.query_rule(dict(document), self._package, self._rule)
        return response.get("result")

    async def revision(self) -> str:
        """Digest of every loaded policy's source and the configured data documents."""
        client = await self._session()
        digest = hashlib.sha256()
        for policy_id in sorted(await client.get_policies_list()):
            policy = await client.get_policy(policy_id)
            digest.update(policy_id.encode())
            digest.update(str(policy.get("result", {}).get("raw", "")).encode())
        for path in self._config.revision_paths:
            try:
                data = await client.get_data(path.strip("/"))
            except Exception:  # noqa: BLE001 - an absent data document is a revision too
                data = None
            digest.update(json.dumps(data, sort_keys=True, default=str).encode())
        return digest.hexdigest()

    async def read_data(self, path: str) -> Any:
        """The data document at ``path`` (``a/b`` for data.a.b); None when it is undefined."""
        client = await self._session()
        try:
            return (await client.get_data(path.strip("/"))).get("result")
        except PolicyNotFoundError:
            return None

    async def patch_data(self, path: str, patches: list[dict[str, Any]]) -> None:
        """Apply JSON Patch operations (paths relative to ``path``) to OPA's data."""
        client = await self._session()
        await client.patch_data(path.strip("/"), patches)

    async def close(self) -> None:
        if self._started:
            await self._client.close_connection()
            self._started = False
