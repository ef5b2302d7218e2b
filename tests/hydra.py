"""Ory Hydra (built by scripts/setup.sh) on free loopback ports, in-memory storage.

``Hydra`` starts it and drives its admin API the way an operator would: clients (each with its
own token strategy, JWT or opaque), client-credentials tokens, key rotation, revocation.
"""

from __future__ import annotations

import base64
import http.client
import json
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import procs
from tests.procs import Proc, free_port

# The key set Hydra signs JWT access tokens with.
ACCESS_TOKEN_KEY_SET = "hydra.jwt.access-token"


def _call(method: str, url: str, body: Any = None, form: dict[str, str] | None = None,
          auth: tuple[str, str] | None = None, timeout_s: float = 60.0) -> Any:
    """One admin or public API call. Generous timeout: Hydra makes its RSA-4096 signing keys on
    first use, which takes tens of seconds on a busy 2-core machine."""
    headers = {"accept": "application/json"}
    data = None
    if form is not None:
        data = urllib.parse.urlencode(form).encode()
        headers["content-type"] = "application/x-www-form-urlencoded"
    elif body is not None:
        data = json.dumps(body).encode()
        headers["content-type"] = "application/json"
    if auth is not None:
        headers["authorization"] = "Basic " + base64.b64encode(
            f"{urllib.parse.quote(auth[0])}:{urllib.parse.quote(auth[1])}".encode()).decode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    for attempt in range(3):
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as resp:
                text = resp.read()
            break
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{method} {url}: HTTP {exc.code}: {exc.read()[:500]!r}") from None
        except (http.client.RemoteDisconnected, ConnectionResetError):
            # Seen once on a machine at load 16: the connection closed before any answer, so
            # nothing was done; ask again.
            if attempt == 2:
                raise
            time.sleep(0.5)
    return json.loads(text) if text.strip() else None


@dataclass
class Hydra:
    log_dir: Path
    public_port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    # Hydra's token hook (``oauth2.token_hook``): a URL it asks for extra claims at each token.
    token_hook_url: str | None = None
    proc: Proc | None = None

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.public_port}"

    @property
    def public(self) -> str:
        return f"http://127.0.0.1:{self.public_port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def introspection_url(self) -> str:
        return f"{self.admin}/admin/oauth2/introspect"

    def start(self, attempts: int = 3) -> Hydra:
        """Start and wait until ready; new ports and another try if it exits while starting
        (another process may bind a port between ``free_port`` and Hydra's own bind)."""
        for attempt in range(attempts):
            try:
                return self._start_once()
            except RuntimeError:  # exited during start-up: its log is in the message
                if attempt == attempts - 1:
                    raise
                self.public_port, self.admin_port = free_port(), free_port()
        raise AssertionError("unreachable")

    def _start_once(self) -> Hydra:
        env = {
            "DSN": "memory",
            "URLS_SELF_ISSUER": self.issuer,
            "SERVE_PUBLIC_HOST": "127.0.0.1", "SERVE_PUBLIC_PORT": str(self.public_port),
            "SERVE_ADMIN_HOST": "127.0.0.1", "SERVE_ADMIN_PORT": str(self.admin_port),
            "SECRETS_SYSTEM": secrets.token_hex(32),
            "STRATEGIES_ACCESS_TOKEN": "jwt",  # a client may ask for opaque tokens instead
            "LOG_LEVEL": "warn",
            "SQA_OPT_OUT": "true",
        }
        if self.token_hook_url:
            env["OAUTH2_TOKEN_HOOK_URL"] = self.token_hook_url
        # --dev: an http:// issuer on loopback (production Hydra insists on https).
        self.proc = procs.start("hydra", [procs.find_binary("hydra"), "serve", "all", "--dev", "--sqa-opt-out"],
                                self.log_dir, env=env, public=self.public_port, admin=self.admin_port)
        procs.wait_http(f"{self.public}/health/ready", proc=self.proc, timeout=120)
        procs.wait_http(f"{self.admin}/health/ready", proc=self.proc, timeout=120)
        self.jwks()  # Hydra makes its signing keys on first use: before any test's clock runs
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    # --- admin API ---------------------------------------------------------------------------
    def create_client(self, client_id: str, *, audience: list[str], scope: str = "completions models",
                      token_strategy: str = "jwt") -> str:
        """A client-credentials client with the chosen id; returns its secret."""
        secret = secrets.token_urlsafe(24)
        _call("POST", f"{self.admin}/admin/clients", {
            "client_id": client_id, "client_secret": secret, "grant_types": ["client_credentials"],
            "token_endpoint_auth_method": "client_secret_basic", "scope": scope, "audience": audience,
            "access_token_strategy": token_strategy,
        })
        return secret

    def token(self, client_id: str, secret: str, *, scope: str = "completions models",
              audience: str | None = None) -> str:
        form = {"grant_type": "client_credentials", "scope": scope}
        if audience is not None:
            form["audience"] = audience
        answer = _call("POST", f"{self.public}/oauth2/token", form=form, auth=(client_id, secret))
        return answer["access_token"]

    def revoke(self, client_id: str, secret: str, token: str) -> None:
        _call("POST", f"{self.public}/oauth2/revoke", form={"token": token}, auth=(client_id, secret))

    def rotate_access_token_key(self, kid: str) -> None:
        """A new signing key in the access-token set; Hydra signs new tokens with it."""
        _call("POST", f"{self.admin}/admin/keys/{ACCESS_TOKEN_KEY_SET}", {"alg": "RS256", "kid": kid, "use": "sig"})

    def delete_access_token_key(self, kid: str) -> None:
        """Withdraw a signing key: Hydra stops publishing it."""
        _call("DELETE", f"{self.admin}/admin/keys/{ACCESS_TOKEN_KEY_SET}/{kid}")

    def jwks(self) -> dict[str, Any]:
        return _call("GET", f"{self.public}/.well-known/jwks.json")


def start_hydra(log_dir: Path, token_hook_url: str | None = None) -> Hydra:
    return Hydra(log_dir, token_hook_url=token_hook_url).start()


class ClaimsHook:
    """The operator's side of Hydra's token hook: extra claims per client, served on loopback.

    Runs in a thread: the tests ask Hydra for tokens with blocking calls, and Hydra calls this
    while it answers them. Hydra puts the claims under ``ext`` in JWT access tokens.
    """

    def __init__(self, claims_by_client: dict[str, dict[str, Any]]) -> None:
        import http.server
        import threading

        claims = claims_by_client

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                extra = claims.get(body["request"]["client_id"], {})
                answer = json.dumps({"session": {"access_token": extra, "id_token": {}}}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/token-hook"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
