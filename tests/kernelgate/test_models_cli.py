"""``kernelgate models load|activate|unload|status`` against a real ``kernelgate serve`` process."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import yaml

from common.processes import free_port, start, wait_http


def test_models_cli_loads_validates_activates_and_unloads(tmp_path) -> None:
    port, admin_port = free_port(), free_port()
    token = tmp_path / "admin-token"
    token.write_text("cli-test-token\n")
    config = tmp_path / "kernelgate.yaml"
    config.write_text(yaml.safe_dump({"inference": {
        "listen": {"host": "127.0.0.1", "port": port},
        "model": {"device": "cpu", "use_deepspeed": False},
        "admin": {"port": admin_port, "token_file": str(token)},
        "models": [{"name": "chat", "versions": [{"version": "v1", "random_config": "tiny-gpt2"}],
                    "batching": {"max_batch_size": 2}}]}}))
    proc = start("inference", [sys.executable, "-m", "kernelgate.cli", "serve", "--config", str(config)],
                 tmp_path, env={"DS_ACCELERATOR": "cpu"})
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", proc=proc, timeout=300)

        def cli(*args: str) -> tuple[int, dict]:
            done = subprocess.run([sys.executable, "-m", "kernelgate.cli", "models", args[0], "--config", str(config),
                                   *args[1:]], capture_output=True, text=True, timeout=300)
            return done.returncode, json.loads(done.stdout)

        rc, loaded = cli("load", "chat", "v2", "--random-config", "tiny-llama", "--activate")
        assert rc == 0 and loaded["state"] == "active", loaded
        rc, status = cli("status")
        assert rc == 0 and status["models"][0]["active"] == "v2"
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", method="POST",
                                         data=json.dumps({"model": "chat", "prompt": "hi", "max_tokens": 3}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            assert resp.headers["x-kernelgate-model-version"] == "v2"
        rc, refused = cli("unload", "chat", "v2")
        assert rc == 1 and refused["error"]["code"] == "version_conflict"
        rc, _ = cli("activate", "chat", "v1")
        assert rc == 1, "v1 was unloaded when v2 took over; it cannot be activated again"
    finally:
        proc.stop()
    server_log = proc.log_path.read_text()
    assert "version v2 active" in server_log and "cli-test-token" not in server_log
