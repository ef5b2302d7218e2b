"""``kernelgate serve`` (``inference.server.run``) in a real process: SIGTERM while a request streams, it completes."""

from __future__ import annotations

import json
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from tests import procs


def test_sigterm_drains_in_flight_request(tmp_path: Path) -> None:
    port = procs.free_port()
    config = {"inference": {"listen": {"host": "127.0.0.1", "port": port},
                            "model": {"name": "tiny-gpt2", "device": "cpu", "use_deepspeed": False},
                            "limits": {"drain_timeout_s": 30}}}
    config_path = tmp_path / "kernelgate.yaml"
    config_path.write_text(yaml.safe_dump(config))
    proc = procs.start("inference", [sys.executable, "-m", "kernelgate.cli", "serve", "--config", str(config_path)],
                       tmp_path, env={"PYTHONUNBUFFERED": "1"}, port=port)
    try:
        procs.wait_http(f"http://127.0.0.1:{port}/readyz", timeout=60, proc=proc)
        body = json.dumps({"model": "tiny-gpt2", "prompt": "drain", "max_tokens": 300, "stream": True,
                           "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            first = resp.readline()
            assert first.startswith(b"data: {")
            proc.popen.send_signal(signal.SIGTERM)
            rest = resp.read().decode()
        events = [line[len("data: "):] for line in (first.decode() + rest).split("\n\n") if line]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        assert proc.popen.wait(30) == 0, proc.log_tail()
        log = proc.log_tail(200)
        assert "shutdown signal received" in log and "drained in" in log
        assert "draining: 1 request(s) in flight" in log
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
            raise AssertionError("server still accepting after drain")
        except (urllib.error.URLError, ConnectionError):
            pass
    finally:
        proc.stop()
