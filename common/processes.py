"""Start and stop processes on loopback: free ports, readiness waits, log files.

Used by ``kernelgate up`` and by the tests' fixtures alike.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from common.binaries import find_binary

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "Proc", "find_binary", "free_port", "start", "wait_http", "wait_tcp"]


class _PortPicker:
    """Ports for servers we are about to start, taken below the kernel's ephemeral range.

    ``bind(0)`` hands out a port from that range, which is also where every outbound connection
    gets its source port: between picking such a port and the server binding it, any connection
    (a client, a health check, pip) could take it, and the server fails with "Address already
    in use". Below the range only servers bind. Ports are tried in sequence from a random start,
    so one process never hands out the same port twice, and each is checked free by binding it.
    """

    def __init__(self) -> None:
        low = 32768
        try:
            low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
        self._first = max(1024, low - 16384)
        self._span = max(low - self._first, 1)
        self._next = itertools.count(random.randrange(self._span))

    def pick(self) -> int:
        for _ in range(256):
            port = self._first + next(self._next) % self._span
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


_PORTS = _PortPicker()


def free_port() -> int:
    """A loopback TCP port nothing listens on, for a server about to be started."""
    return _PORTS.pick()


def wait_tcp(port: int, timeout: float = 30.0, proc: "Proc | None" = None, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} not open after {timeout}s" + (f"\n{proc.log_tail()}" if proc else ""))


def wait_http(url: str, timeout: float = 30.0, proc: "Proc | None" = None, status: int = 200) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == status:
                    return
                last = resp.status
        except Exception as exc:  # noqa: BLE001 - keep polling until the deadline
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s (last: {last})" + (f"\n{proc.log_tail()}" if proc else ""))


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    ports: dict[str, int] = field(default_factory=dict)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode

    def kill(self) -> None:
        self.stop(sig=signal.SIGKILL)


def start(name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None, **ports: int) -> Proc:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    full_env = dict(os.environ)
    full_env.update(env or {})
    log = open(log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
    popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                             cwd=str(cwd or ROOT), start_new_session=True)
    log.close()
    return Proc(name=name, popen=popen, log_path=log_path, ports=dict(ports))
