"""Tensor-parallel serving: one HTTP front end, every rank stepping the same batch.

In: a ``ModelConfig`` with ``tp_size`` N > 1 (a Llama-family model on the fused decoder) and
the batching bounds. Out, for the server (rank 0): a ``load`` for the engine that starts
ranks 1..N-1 as child processes, joins them in a DeepSpeed communication group and loads
this rank's shard; a ``mirror`` that wraps the engine's runner so that every step (prefill,
decode, slot move, graph capture) is sent to the followers before rank 0 runs it; and a
watch that fails the engine (so ``/readyz`` says not ready and waiting clients get an error)
as soon as a follower process exits, because a collective with a dead rank would otherwise
wait forever.

Ranks: rank r runs on ``cuda:r`` (NCCL all-reduce inside the layers, captured in the decode
CUDA graphs), or on the CPU with gloo. Step commands travel over a separate gloo group as
int64 tensors: an op header, then its payload. Sampling happens on rank 0 only; followers
compute the same logits and drop them. Followers exit when told to stop, when a command
cannot be received (rank 0 gone), or, on Linux, when their parent dies (PDEATHSIG).

``python -m inference.tensor_parallel --rank R ...`` is the follower's entry point; the
server builds that command line itself.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch

from inference.config import BatchingConfig, ModelConfig
from inference.llama import TensorParallel
from inference.model_loader import LoadedModel, load_model, resolve_device
from inference.runner import ModelRunner

log = logging.getLogger("kernelgate.inference.tp")

OP_PREFILL, OP_DECODE, OP_MOVE, OP_CAPTURE, OP_STOP = range(5)
_HEADER = 3  # op, payload length, spare
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def _join(rank: int, world_size: int, port: int, backend: str) -> tuple[TensorParallel, Any]:
    """Join the group; return the TP handle (its all-reduce) and the control group.

    On CUDA the group is DeepSpeed's (``deepspeed.init_distributed``, NCCL) and the layers'
    all-reduce is ``deepspeed.comm.all_reduce``. On the CPU it is torch.distributed's gloo
    directly: DeepSpeed's CPU backend JIT-compiles a shared-memory op at start-up (a C++
    build per machine, and two ranks building at once wait on one lock).
    """
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)})
    if backend == "nccl":
        torch.cuda.set_device(rank)
        import deepspeed
        import deepspeed.comm as dist

        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=COLLECTIVE_TIMEOUT, rank=rank, world_size=world_size)
        reduce = dist.all_reduce
    else:
        torch.distributed.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, rank=rank, world_size=world_size)
        reduce = torch.distributed.all_reduce
    control = torch.distributed.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)

    def all_reduce(tensor: torch.Tensor) -> None:
        reduce(tensor)

    return TensorParallel(rank=rank, world_size=world_size, all_reduce=all_reduce), control


def _backend(config: ModelConfig) -> str:
    return "nccl" if resolve_device(config.device).type == "cuda" else "gloo"


class MirroredRunner:
    """Rank 0's runner: sends each step to the followers, then runs it here."""

    def __init__(self, runner: ModelRunner, control: Any) -> None:
        self._runner = runner
        self._control = control

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def _send(self, op: int, payload: list[int]) -> None:
        header = torch.tensor([op, len(payload), 0], dtype=torch.long)
        torch.distributed.broadcast(header, src=0, group=self._control)
        if payload:
            torch.distributed.broadcast(torch.tensor(payload, dtype=torch.long), src=0, group=self._control)

    def prefill(self, first_slot: int, prompts: list[list[int]]) -> torch.Tensor:
        return self.prefill_full(first_slot, prompts, [])[0]

    def prefill_full(self, first_slot: int, prompts: list[list[int]],
                     full_rows: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The followers run the same prefill (its collectives); the LM head is replicated, so the
        extra logits of ``full_rows`` (prompt log-probabilities) are computed here alone."""
        self._send(OP_PREFILL, [first_slot, len(prompts)] + [len(p) for p in prompts] + [t for p in prompts for t in p])
        return self._runner.prefill_full(first_slot, prompts, full_rows)

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        self._send(OP_DECODE, list(tokens) + list(positions))
        return self._runner.decode(tokens, positions)

    def move(self, src: int, dst: int, length: int) -> None:
        self._send(OP_MOVE, [src, dst, length])
        self._runner.move(src, dst, length)

    def capture_decode_graphs(self) -> int:
        self._send(OP_CAPTURE, [])
        return self._runner.capture_decode_graphs()

    def close(self) -> None:
        """Tell the followers to exit (best effort: one may already be gone)."""
        try:
            self._send(OP_STOP, [])
        except Exception:  # noqa: BLE001 - shutting down anyway
            log.info("could not tell every follower to stop (one has exited)")


def follow(runner: ModelRunner, control: Any) -> None:
    """A follower's loop: run each step rank 0 sends, until it sends stop."""
    header = torch.zeros(_HEADER, dtype=torch.long)
    while True:
        torch.distributed.broadcast(header, src=0, group=control)
        op, length = int(header[0]), int(header[1])
        payload: list[int] = []
        if length:
            data = torch.empty(length, dtype=torch.long)
            torch.distributed.broadcast(data, src=0, group=control)
            payload = data.tolist()
        if op == OP_STOP:
            return
        if op == OP_PREFILL:
            first_slot, rows = payload[0], payload[1]
            lengths, flat = payload[2:2 + rows], payload[2 + rows:]
            prompts, at = [], 0
            for n in lengths:
                prompts.append(flat[at:at + n])
                at += n
            runner.prefill(first_slot, prompts)
        elif op == OP_DECODE:
            half = len(payload) // 2
            runner.decode(payload[:half], payload[half:])
        elif op == OP_MOVE:
            runner.move(*payload)
        elif op == OP_CAPTURE:
            runner.capture_decode_graphs()
        else:
            raise RuntimeError(f"unknown tensor-parallel op {op}")


class TensorParallelGroup:
    """Rank 0's side of the group: starts the followers, loads the shard, watches the followers."""

    def __init__(self, model: ModelConfig, batching: BatchingConfig, port: int,
                 on_follower_exit: Callable[[BaseException], None] | None = None) -> None:
        if model.tp_size < 2:
            raise ValueError("TensorParallelGroup needs model.tp_size >= 2")
        self._model = model
        self._batching = batching
        self._port = port
        self.on_follower_exit = on_follower_exit
        self._followers: list[subprocess.Popen] = []
        self._control: Any = None
        self._closing = threading.Event()
        self._lost_rank = False

    def follower_command(self, rank: int) -> list[str]:
        return [sys.executable, "-m", "inference.tensor_parallel", "--rank", str(rank),
                "--world-size", str(self._model.tp_size), "--port", str(self._port),
                "--model", json.dumps(dataclasses.asdict(self._model)),
                "--max-batch-size", str(self._batching.max_batch_size)]

    def load(self, config: ModelConfig, max_batch_size: int) -> LoadedModel:
        """The engine's ``load``: start followers, join them, load rank 0's shard."""
        for rank in range(1, config.tp_size):
            self._followers.append(subprocess.Popen(self.follower_command(rank), start_new_session=False))
        threading.Thread(target=self._watch, name="kernelgate-tp-watch", daemon=True).start()
        tp, self._control = _join(0, config.tp_size, self._port, _backend(config))
        log.info("tensor parallel group of %d ranks joined (%s)", config.tp_size, _backend(config))
        return load_model(config, max_batch_size, tp=tp)

    def mirror(self, runner: ModelRunner) -> MirroredRunner:
        return MirroredRunner(runner, self._control)

    def _watch(self) -> None:
        while not self._closing.is_set():
            for rank, proc in enumerate(self._followers, start=1):
                code = proc.poll()
                if code is not None and not self._closing.is_set():
                    self._lost_rank = True
                    error = RuntimeError(f"tensor-parallel rank {rank} exited with status {code}")
                    log.error("%s: the model is not ready any more", error)
                    if self.on_follower_exit is not None:
                        self.on_follower_exit(error)
                    return
            time.sleep(0.2)

    def close(self, timeout: float = 10.0) -> None:
        """Stop watching, wait for the followers (they exit on OP_STOP) or end them, and leave the
        group so this process can form another. With a rank lost the group is left as it is:
        tearing down a communicator a collective still waits on can block."""
        self._closing.set()
        deadline = time.monotonic() + timeout
        for proc in self._followers:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if not self._lost_rank and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the parent (rank 0) dies, even if it could not say stop."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    """A follower rank: join, load the same model's shard, build the same runner, follow rank 0."""
    parser = argparse.ArgumentParser(description="kernelgate tensor-parallel follower (started by the server)")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True, help="the ModelConfig, as JSON")
    parser.add_argument("--max-batch-size", type=int, required=True)
    args = parser.parse_args(argv)
    _die_with_parent()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank{args.rank} %(name)s: %(message)s")
    model = ModelConfig(**json.loads(args.model))
    tp, control = _join(args.rank, args.world_size, args.port, _backend(model))
    with torch.inference_mode():
        loaded = load_model(model, args.max_batch_size, tp=tp)
        runner = ModelRunner(loaded.module, loaded.attention, num_slots=args.max_batch_size,
                             max_len=loaded.max_model_len, dtype=loaded.dtype, device=loaded.device,
                             use_cuda_graphs=model.cuda_graphs)
        follow(runner, control)
    log.info("rank %d stopped", args.rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
