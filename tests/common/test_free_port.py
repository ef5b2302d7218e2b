"""free_port (common/processes.py): ports for servers the fixtures start, never one an outbound
connection could take in the meantime."""

from __future__ import annotations

import socket
from pathlib import Path

from common.processes import free_port


def test_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= p < low for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))


def test_a_port_in_use_is_skipped() -> None:
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        port = free_port()
        busy.bind(("127.0.0.1", port + 1))
        busy.listen()
        assert free_port() != port + 1, "the next in sequence is taken: skipped"
