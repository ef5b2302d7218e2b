"""Tensor parallel on the CPU (gloo, two processes): one HTTP front end, same greedy tokens as one
process; a follower that dies, or one that stops answering (the hang), takes the server to
not-ready with the reason logged instead of hanging it; the GPU bench's tensor-parallel flow
(tp_size 1 then 2 in one run, group formed and left per model) finishes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import yaml

from tests import procs

MODEL = {"name": "tiny-llama", "random_config": "tiny-llama", "device": "cpu", "use_deepspeed": False}
PROMPTS = [[5, 17, 99, 3], list(range(40, 71)), [200, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]


def _serve(tmp_path: Path, tp_size: int, batching: dict | None = None, **model: object) -> tuple[procs.Proc, int]:
    port = procs.free_port()
    config = {"inference": {"listen": {"host": "127.0.0.1", "port": port},
                            "model": {**MODEL, "tp_size": tp_size, **model},
                            "batching": {"max_batch_size": 4, **(batching or {})},
                            "limits": {"drain_timeout_s": 5}}}
    path = tmp_path / f"tp{tp_size}.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = procs.start(f"inference-tp{tp_size}", [sys.executable, "-m", "kernelgate.cli", "serve", "--config", str(path)],
                       tmp_path, env={"PYTHONUNBUFFERED": "1"}, port=port)
    procs.wait_http(f"http://127.0.0.1:{port}/readyz", timeout=120, proc=proc)
    return proc, port


def _complete(port: int, prompt: list[int], max_tokens: int = 16) -> tuple[int, dict]:
    body = json.dumps({"model": MODEL["name"], "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _pipelined_steps(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    match = re.search(r"^kernelgate_inference_pipelined_decode_steps_total (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _followers(proc: procs.Proc) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.popen.pid).children(recursive=True)
            if "inference.tensor_parallel" in " ".join(p.cmdline())]


def test_two_ranks_give_the_same_greedy_text_and_a_dead_rank_means_not_ready(tmp_path: Path) -> None:
    # The reference: one process, one decode step at a time. The pair pipelines its decode steps
    # (the followers get those steps' tokens by broadcast); requests of different lengths at once
    # end mid-batch while a step is already launched.
    lengths = [16, 5, 11]
    single, port1 = _serve(tmp_path, 1, batching={"pipeline_decode": False})
    try:
        want = [_complete(port1, p, n) for p, n in zip(PROMPTS, lengths)]
    finally:
        single.stop()
    assert all(status == 200 for status, _ in want)

    pair, port2 = _serve(tmp_path, 2)
    try:
        followers = _followers(pair)
        assert len(followers) == 1
        assert "tensor parallel group of 2 ranks joined (gloo)" in pair.log_tail(400)
        got = [_complete(port2, p, n) for p, n in zip(PROMPTS, lengths)]
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            together = list(pool.map(_complete, [port2] * len(PROMPTS), PROMPTS, lengths))
        texts = [b["choices"][0]["text"] for _, b in want]
        assert [b["choices"][0]["text"] for _, b in got] == texts
        assert [b["choices"][0]["text"] for _, b in together] == texts
        assert _pipelined_steps(port2) > 0

        followers[0].kill()
        deadline = time.monotonic() + 10
        while _readyz(port2) == 200:
            assert time.monotonic() < deadline, "server still ready 10 s after its follower died"
            time.sleep(0.1)
        started = time.monotonic()
        status, body = _complete(port2, PROMPTS[0])
        assert status == 503, body
        assert time.monotonic() - started < 10
        assert "tensor-parallel rank 1 exited" in pair.log_tail(400)
    finally:
        pair.stop()


def test_sigterm_stops_every_rank(tmp_path: Path) -> None:
    pair, _ = _serve(tmp_path, 2)
    followers = _followers(pair)
    assert len(followers) == 1
    assert pair.stop() == 0, pair.log_tail()
    gone, alive = psutil.wait_procs(followers, timeout=10)
    assert not alive, f"follower still running after the server stopped: {alive}"


def test_a_follower_that_stops_answering_takes_the_server_to_not_ready_within_the_timeout(tmp_path: Path) -> None:
    """The hang: a rank alive but stuck (SIGSTOP) leaves rank 0 in the collective; the watchdog ends it."""
    timeout_s = 8.0
    pair, port = _serve(tmp_path, 2, tp_timeout_s=timeout_s)
    followers = _followers(pair)
    try:
        assert _complete(port, PROMPTS[0])[0] == 200
        time.sleep(timeout_s + 2)  # idle longer than the timeout: waiting for work is not a hang
        assert _readyz(port) == 200
        assert _complete(port, PROMPTS[0])[0] == 200
        followers[0].send_signal(signal.SIGSTOP)
        started = time.monotonic()
        status, body = _complete(port, PROMPTS[1], max_tokens=8)
        waited = time.monotonic() - started
        assert status == 503, body
        assert waited < timeout_s + 20, f"the request waited {waited:.0f}s"
        assert _readyz(port) == 503
        log = pair.log_tail(4000)
        assert "waited more than 8s for the other ranks" in log, log
        assert "not ready any more" in log
        gone, alive = psutil.wait_procs(followers, timeout=10)
        assert not alive, "the stuck follower was not ended"
    finally:
        for follower in followers:
            if follower.is_running():
                follower.kill()
        pair.stop()


def test_the_gpu_bench_tensor_parallel_flow_finishes_on_cpu_with_every_rank_logged(tmp_path: Path) -> None:
    """bench/inference_llama_gpu.py --tp 2 as scripts/gpu_bench.sh llama-tp2 runs it (greedy check with
    tp_size 1 in process, then 2 in a child), two models in a row: this is where the two-GPU run hung."""
    out = tmp_path / "tp2.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = subprocess.run([sys.executable, str(procs.ROOT / "bench" / "inference_llama_gpu.py"), "--device", "cpu",
                          "--tp", "2", "--skip", "hf,step,server", "--check-model", "", "--step-timeout", "240",
                          "--models", "tiny-llama,tiny-qwen2", "--out", str(out), "--log-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env=env)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    result = json.loads(out.read_text())
    assert {name: result["tp2"][name]["greedy_equal"] for name in ("tiny-llama", "tiny-qwen2")} == {
        "tiny-llama": True, "tiny-qwen2": True}
    assert "rank0 kernelgate.inference.tp: tensor parallel group of 2 ranks joined" in output
    assert output.count("rank1 kernelgate.inference.tp: rank 1 stopped") == 2
