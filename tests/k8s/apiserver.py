"""A real Kubernetes API server on loopback: kine (etcd over SQLite) and kube-apiserver.

In: a directory to keep state and logs. Out: a ``Cluster`` with the server's URL, its CA, an
admin token, and a ``kubernetes`` client for it. scripts/setup.sh builds both programs
(kube-apiserver from k8s.io/kubernetes, kine from github.com/k3s-io/kine).

The server runs as a cluster's would, less the controllers and the kubelet: token
authentication (a token file), RBAC authorization, the default admission plugins (Pod
Security among them), service-account tokens signed with a key pair made here, and a
self-signed serving certificate in its cert dir. Nothing schedules or runs pods.
"""

from __future__ import annotations

import json
import secrets
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from kubernetes import client, dynamic

from tests import procs

ADMIN_USER = "kernelgate-admin"
SERVICE_CIDR = "10.96.0.0/16"
READY_TIMEOUT_S = 180  # ~20 s on an idle machine; CI's machine may be busy


@dataclass(frozen=True)
class Cluster:
    url: str
    ca_file: Path
    admin_token: str
    log_dir: Path

    def api_client(self, token: str | None = None) -> client.ApiClient:
        """A client authenticated with ``token`` (the admin's by default)."""
        config = client.Configuration()
        config.host = self.url
        config.ssl_ca_cert = str(self.ca_file)
        config.api_key = {"BearerToken": token or self.admin_token}
        config.api_key_prefix = {"BearerToken": "Bearer"}
        return client.ApiClient(config)

    def dynamic(self, token: str | None = None) -> dynamic.DynamicClient:
        return dynamic.DynamicClient(self.api_client(token))

    def apply(self, doc: dict[str, Any], manager: str = "kernelgate-tests",
              token: str | None = None) -> Applied:
        """Server-side apply (``kubectl apply --server-side``), unknown fields an error."""
        api = self.dynamic(token)
        resource = api.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        response = api.server_side_apply(resource, body=doc, namespace=doc["metadata"].get("namespace"),
                                         field_manager=manager, force_conflicts=True, serialize=False,
                                         query_params=[("fieldValidation", "Strict")])
        warnings = [w for w in response.headers.get_all("warning") or []] if hasattr(response.headers, "get_all") \
            else [v for k, v in response.headers.items() if k.lower() == "warning"]
        return Applied(stored=json.loads(response.data), warnings=warnings)

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None,
            token: str | None = None) -> dict[str, Any]:
        api = self.dynamic(token)
        resource = api.resources.get(api_version=api_version, kind=kind)
        return api.get(resource, name=name, namespace=namespace).to_dict()

    def create(self, doc: dict[str, Any], token: str | None = None) -> dict[str, Any]:
        api = self.dynamic(token)
        resource = api.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        return api.create(resource, body=doc, namespace=doc["metadata"].get("namespace")).to_dict()

    def list(self, api_version: str, kind: str, namespace: str | None = None,
             label_selector: str | None = None, token: str | None = None) -> list[dict[str, Any]]:
        api = self.dynamic(token)
        resource = api.resources.get(api_version=api_version, kind=kind)
        return api.get(resource, namespace=namespace, label_selector=label_selector).to_dict()["items"]


@dataclass(frozen=True)
class Applied:
    """What the API server stored for one applied object, and the warnings it answered with."""

    stored: dict[str, Any]
    warnings: list[str]


def write_service_account_keys(directory: Path) -> tuple[Path, Path]:
    """The key pair service-account tokens are signed (private) and verified (public) with."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private, public = directory / "sa.key", directory / "sa.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def start_kine(directory: Path) -> procs.Proc:
    port = procs.free_port()
    args = [procs.find_binary("kine"), "--listen-address", f"127.0.0.1:{port}",
            "--endpoint", f"sqlite://{directory / 'state.db'}?_journal=WAL&cache=shared",
            "--metrics-bind-address", "0"]
    proc = procs.start("kine", args, directory, port=port)
    procs.wait_tcp(port, timeout=60, proc=proc)
    return proc


def start_apiserver(directory: Path, etcd_port: int) -> tuple[procs.Proc, Cluster]:
    port = procs.free_port()
    token = secrets.token_urlsafe(32)
    tokens = directory / "tokens.csv"
    tokens.write_text(f'{token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n')
    tokens.chmod(0o600)
    private, public = write_service_account_keys(directory)
    cert_dir = directory / "certs"
    args = [procs.find_binary("kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={port}",
            f"--cert-dir={cert_dir}",
            f"--token-auth-file={tokens}",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={public}", f"--service-account-signing-key-file={private}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=false", "--profiling=false", "--enable-priority-and-fairness=false",
            "--endpoint-reconciler-type=none"]
    proc = procs.start("kube-apiserver", args, directory, port=port)
    cluster = Cluster(url=f"https://127.0.0.1:{port}", ca_file=cert_dir / "apiserver.crt",
                      admin_token=token, log_dir=directory)
    wait_ready(cluster, proc)
    return proc, cluster


def wait_ready(cluster: Cluster, proc: procs.Proc, timeout: float = READY_TIMEOUT_S) -> None:
    """Poll ``/readyz`` (all post-start hooks done: RBAC's bootstrap roles among them)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"kube-apiserver exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        if cluster.ca_file.exists():
            context = ssl.create_default_context(cafile=str(cluster.ca_file))
            request = urllib.request.Request(f"{cluster.url}/readyz",
                                             headers={"authorization": f"Bearer {cluster.admin_token}"})
            try:
                with urllib.request.urlopen(request, timeout=5, context=context) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last = exc
        time.sleep(0.5)
    raise TimeoutError(f"kube-apiserver not ready after {timeout}s (last: {last})\n{proc.log_tail()}")


@contextmanager
def running_cluster(directory: Path) -> Iterator[Cluster]:
    directory.mkdir(parents=True, exist_ok=True)
    kine = start_kine(directory)
    try:
        apiserver, cluster = start_apiserver(directory, kine.ports["port"])
        try:
            yield cluster
        finally:
            apiserver.stop()
    finally:
        kine.stop()
