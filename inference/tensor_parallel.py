"""Tensor-parallel serving: one HTTP front end, every rank stepping the same batch.

In: a ``ModelConfig`` with ``tp_size`` N > 1 (a Llama-family model on the fused decoder) and
the batching bounds. Out, for the server (rank 0): a ``load`` for the engine that starts
ranks 1..N-1 as child processes, joins them in a DeepSpeed communication group and loads
this rank's shard; a ``mirror`` that wraps the engine's runner so that every step (prefill,
decode, slot move, graph capture) is sent to the followers before rank 0 runs it; and a
watchdog that fails the engine (``/readyz`` not ready, waiting clients get an error, the
reason logged) when a follower exits or when any wait on the other ranks (the join, one
step, the capture, the stop) outlives ``model.tp_timeout_s``: a collective with a dead or
stuck rank would otherwise wait forever.

Ranks: rank r runs on ``cuda:r`` (NCCL all-reduce inside the layers, captured in the decode
CUDA graphs), or on the CPU with gloo. Step commands travel down each follower's stdin as
int64 frames (op, payload length, payload): a pipe needs no timeout while the server is idle,
a write to a dead follower fails at once, and a follower reads end-of-file when rank 0 is
gone. The first command (``OP_SETUP``) carries rank 0's runner geometry (slots, context,
CUDA graphs), so every rank builds the same runner and captures the same graphs. Sampling
happens on rank 0 only; followers compute the same logits and drop them. A pipelined decode
step (``OP_DECODE_FROM``: launched before rank 0 read the previous step's tokens) carries only
positions; its tokens reach the followers from rank 0's device by a broadcast over the group.
Rank 0 waits for each step inside the watchdog's bracket; for a pipelined step that is the wait
for the step queued before it (and ``wait_queued`` for the last one), so the host's work still
overlaps the device's step.

Stop: rank 0 sends ``OP_STOP`` and every rank leaves the group together (gloo's
``destroy_process_group`` waits for every member; NCCL's communicators are aborted after a
device sync, since ``ncclCommDestroy`` was seen to block after graph-captured all-reduces).
With a rank lost the group is not torn down at all. Followers also exit on end-of-file and,
on Linux, when their parent dies (PDEATHSIG).

``python -m inference.tensor_parallel --rank R ...`` is the follower's entry point; the
server builds that command line itself. Its log lines (tagged ``rankR``) go to the server's
own output.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import ctypes
import dataclasses
import faulthandler
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import IO, Any

import torch

from inference.config import BatchingConfig, ModelConfig
from inference.llama import TensorParallel
from inference.model_loader import LoadedModel, load_model, resolve_device
from inference.runner import ModelRunner

log = logging.getLogger("kernelgate.inference.tp")

OP_SETUP, OP_PREFILL, OP_DECODE, OP_MOVE, OP_CAPTURE, OP_STOP, OP_DECODE_FROM = range(7)
OP_NAMES = ("setup", "prefill", "decode", "move", "graph capture", "stop", "decode")
JOIN_TIMEOUT = timedelta(minutes=10)  # starting the followers' interpreters and the rendezvous
_WORD = 8  # bytes of one int64


def _join(rank: int, world_size: int, port: int, backend: str) -> TensorParallel:
    """Join the group; return the TP handle (its all-reduce, and the all-gather of ``tp_invariant`` numerics).

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
                                   timeout=JOIN_TIMEOUT, rank=rank, world_size=world_size)
        reduce = dist.all_reduce

        def all_gather(out: torch.Tensor, local: torch.Tensor) -> None:  # torch's own (DeepSpeed's wraps it)
            torch.distributed.all_gather_into_tensor(out, local)
    else:
        torch.distributed.init_process_group(backend, timeout=JOIN_TIMEOUT, rank=rank, world_size=world_size)
        reduce = torch.distributed.all_reduce

        def all_gather(out: torch.Tensor, local: torch.Tensor) -> None:  # gloo: into a list (contiguous chunks)
            torch.distributed.all_gather(list(out.chunk(world_size)), local)

    def all_reduce(tensor: torch.Tensor) -> None:
        reduce(tensor)

    return TensorParallel(rank=rank, world_size=world_size, all_reduce=all_reduce, all_gather=all_gather)


def _leave() -> None:
    """Leave the group: gloo's is destroyed; NCCL's communicators are aborted after a device sync.

    The caller drops its runner's decode graphs first (``ModelRunner.release_graphs``): with
    graphs that captured the all-reduces still alive, both ``destroy_process_group`` and the
    abort blocked for over 120 s on both ranks of the H200 pair. Once this rank's stream is
    drained nothing of the group is in flight, and ``ncclCommAbort`` frees the communicators
    without waiting on the other ranks.
    """
    if not torch.distributed.is_initialized():
        return
    if torch.distributed.get_backend() == "nccl":
        torch.cuda.synchronize()
        torch.distributed.distributed_c10d._abort_process_group()
    else:
        torch.distributed.destroy_process_group()


def _backend(config: ModelConfig) -> str:
    return "nccl" if resolve_device(config.device).type == "cuda" else "gloo"


def encode(op: int, payload: list[int]) -> bytes:
    """One command frame: op, payload length, payload (native int64)."""
    return array.array("q", [op, len(payload)]).tobytes() + array.array("q", payload).tobytes()


def read_command(stream: IO[bytes]) -> tuple[int, list[int]] | None:
    """The next frame from ``stream``; None at end of file (rank 0 is gone)."""
    header = stream.read(2 * _WORD)
    if len(header) < 2 * _WORD:
        return None
    op, length = array.array("q", header)
    body = stream.read(length * _WORD) if length else b""
    if len(body) < length * _WORD:
        return None
    return op, array.array("q", body).tolist()


class Watchdog:
    """Rank 0's deadlines on the other ranks, and the followers' exits, watched from a thread.

    ``waiting(what)`` brackets one wait of the engine thread; if it lasts longer than its
    timeout, or a follower exits, the watchdog logs why, kills the followers (a stuck rank
    holds its GPU and the collective) and calls ``on_failure`` once.
    """

    def __init__(self, followers: list[subprocess.Popen], timeout_s: float,
                 on_failure: Callable[[BaseException], None]) -> None:
        self._followers = followers
        self.timeout_s = timeout_s
        self._on_failure = on_failure
        self._wait: tuple[str, float, float] | None = None  # what, started, deadline
        self._stopped = threading.Event()
        self.failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kernelgate-tp-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (a clean shutdown: followers exiting is expected from here on)."""
        self._stopped.set()

    @contextlib.contextmanager
    def waiting(self, what: str, timeout_s: float | None = None) -> Iterator[None]:
        started = time.monotonic()
        self._wait = (what, started, started + (timeout_s or self.timeout_s))
        try:
            yield
        finally:
            self._wait = None

    def _run(self) -> None:
        while not self._stopped.wait(0.1):
            for rank, proc in enumerate(self._followers, start=1):
                code = proc.poll()
                if code is not None:
                    self._fail(f"tensor-parallel rank {rank} exited with status {code}")
                    return
            wait = self._wait
            if wait is not None and time.monotonic() > wait[2]:
                what, started, deadline = wait
                self._fail(f"tensor-parallel {what} waited more than {deadline - started:.0f}s for the other "
                           f"ranks (model.tp_timeout_s); ending them")
                return

    def _fail(self, reason: str) -> None:
        if self._stopped.is_set():
            return
        self.failed = RuntimeError(reason)
        log.error("%s: the model is not ready any more", reason)
        dump_stacks(self._followers)
        for proc in self._followers:
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        self._on_failure(self.failed)


class MirroredRunner:
    """Rank 0's runner: sends each step to the followers, then runs it here, under the watchdog.

    On CUDA each step waits for its own kernels inside the watch: that is where a collective
    with a stuck rank would block (the engine's sampling sync comes right after anyway).
    """

    def __init__(self, runner: ModelRunner, group: TensorParallelGroup) -> None:
        self._runner = runner
        self._group = group
        self._queued: torch.cuda.Event | None = None  # recorded after the last pipelined step, not yet waited for
        group.send(OP_SETUP, [runner.num_slots, runner.max_len, int(runner.use_cuda_graphs)])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    @contextlib.contextmanager
    def _step(self, op: int, payload: list[int], timeout_s: float | None = None) -> Iterator[None]:
        with self._group.watchdog.waiting(OP_NAMES[op] + " step", timeout_s):
            self._group.send(op, payload)
            yield
            if self._runner.device.type == "cuda":
                torch.cuda.current_stream(self._runner.device).synchronize()
                self._queued = None

    def prefill(self, first_slot: int, prompts: list[list[int]]) -> torch.Tensor:
        return self.prefill_full(first_slot, prompts, [])[0]

    def prefill_full(self, first_slot: int, prompts: list[list[int]],
                     full_rows: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The followers run the same prefill (its collectives); the LM head is replicated, so the
        extra logits of ``full_rows`` (prompt log-probabilities) are computed here alone."""
        payload = [first_slot, len(prompts)] + [len(p) for p in prompts] + [t for p in prompts for t in p]
        with self._step(OP_PREFILL, payload):
            return self._runner.prefill_full(first_slot, prompts, full_rows)

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        with self._step(OP_DECODE, list(tokens) + list(positions)):
            return self._runner.decode(tokens, positions)

    def decode_from(self, tokens: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """A pipelined decode step: rank 0's tokens are still on its device (not read back), so they
        reach the followers by a broadcast over the group, queued before the step's collectives.

        It does not wait for itself (that would undo the pipelining): it waits, inside the
        watchdog's bracket, for the step queued before it, whose tokens the engine reads next. The
        last one of a run is waited for by :meth:`wait_queued`.
        """
        with self._group.watchdog.waiting(OP_NAMES[OP_DECODE_FROM] + " step"):
            self._group.send(OP_DECODE_FROM, list(positions))
            torch.distributed.broadcast(tokens, src=0)
            logits = self._runner.decode_from(tokens, positions)
            if self._runner.device.type == "cuda":
                before, self._queued = self._queued, torch.cuda.Event()
                self._queued.record()
                if before is not None:
                    before.synchronize()
        return logits

    def wait_queued(self) -> None:
        """Wait for the last pipelined step, under the watchdog (a stuck rank fails the engine here
        instead of hanging the engine's read of that step's tokens)."""
        if self._queued is not None:
            with self._group.watchdog.waiting(OP_NAMES[OP_DECODE_FROM] + " step"):
                self._queued.synchronize()
            self._queued = None

    def decode_timed(self, tokens: list[int], positions: list[int]) -> tuple[torch.Tensor, Any]:
        with self._step(OP_DECODE, list(tokens) + list(positions)):
            return self._runner.decode_timed(tokens, positions)

    def move(self, src: int, dst: int, length: int) -> None:
        with self._step(OP_MOVE, [src, dst, length]):
            self._runner.move(src, dst, length)

    def capture_decode_graphs(self) -> int:
        # Capture runs a warm-up step per graph: give it the timeout of a few dozen steps.
        with self._step(OP_CAPTURE, [], 10 * self._group.watchdog.timeout_s):
            return self._runner.capture_decode_graphs()

    def close(self) -> None:
        self._runner.release_graphs()  # every rank drops its graphs before the group goes
        self._group.stop()


def follow(runner: ModelRunner, commands: IO[bytes]) -> bool:
    """A follower's loop: run each step rank 0 sends; True when told to stop, False at end of file."""
    while True:
        command = read_command(commands)
        if command is None:
            return False
        op, payload = command
        if op == OP_STOP:
            return True
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
        elif op == OP_DECODE_FROM:  # the tokens come from rank 0's device, by broadcast
            tokens = torch.empty(len(payload), dtype=torch.long, device=runner.device)
            torch.distributed.broadcast(tokens, src=0)
            runner.decode_from(tokens, payload)
        elif op == OP_MOVE:
            runner.move(*payload)
        elif op == OP_CAPTURE:
            runner.capture_decode_graphs()
        else:
            raise RuntimeError(f"unexpected tensor-parallel op {op}")


class TensorParallelGroup:
    """Rank 0's side of the group: starts the followers, loads the shard, watches the other ranks."""

    def __init__(self, model: ModelConfig, batching: BatchingConfig, port: int,
                 on_failure: Callable[[BaseException], None] | None = None) -> None:
        if model.tp_size < 2:
            raise ValueError("TensorParallelGroup needs model.tp_size >= 2")
        self._model = model
        self._batching = batching
        self._port = port
        self.on_failure = on_failure
        self._followers: list[subprocess.Popen] = []
        self.watchdog = Watchdog(self._followers, model.tp_timeout_s, self._failed)
        self._stopped = False
        self._lock = threading.Lock()

    def follower_command(self, rank: int) -> list[str]:
        return [sys.executable, "-m", "inference.tensor_parallel", "--rank", str(rank),
                "--world-size", str(self._model.tp_size), "--port", str(self._port),
                "--model", json.dumps(dataclasses.asdict(self._model)),
                "--max-batch-size", str(self._batching.max_batch_size)]

    def load(self, config: ModelConfig, max_batch_size: int) -> LoadedModel:
        """The engine's ``load``: start followers, join them, load rank 0's shard."""
        for rank in range(1, config.tp_size):
            self._followers.append(subprocess.Popen(self.follower_command(rank), stdin=subprocess.PIPE))
        self.watchdog.start()
        with self.watchdog.waiting("join", JOIN_TIMEOUT.total_seconds()):
            tp = _join(0, config.tp_size, self._port, _backend(config))
        log.info("tensor parallel group of %d ranks joined (%s)", config.tp_size, _backend(config))
        return load_model(config, max_batch_size, tp=tp)

    def mirror(self, runner: ModelRunner) -> MirroredRunner:
        return MirroredRunner(runner, self)

    def send(self, op: int, payload: list[int]) -> None:
        """Write one command to every follower; a follower that is gone fails the step at once."""
        frame = encode(op, payload)
        with self._lock:
            for rank, proc in enumerate(self._followers, start=1):
                try:
                    assert proc.stdin is not None
                    proc.stdin.write(frame)
                    proc.stdin.flush()
                except (BrokenPipeError, ValueError) as exc:
                    raise RuntimeError(f"tensor-parallel rank {rank} is gone ({exc})") from exc

    def _failed(self, error: BaseException) -> None:
        if self.on_failure is not None:
            self.on_failure(error)

    def stop(self) -> None:
        """Tell the followers to stop and leave the group with them (once; not with a rank lost)."""
        if self._stopped or self.watchdog.failed is not None:
            return
        self._stopped = True
        self.watchdog.stop()  # from here on followers exit on purpose
        try:
            self.send(OP_STOP, [])
        except RuntimeError:
            log.info("could not tell every follower to stop (one has exited)")
            return
        # Every rank destroys the group at the same time; bounded, should one not take part.
        leaving = threading.Thread(target=_leave, name="kernelgate-tp-leave", daemon=True)
        leaving.start()
        leaving.join(self.watchdog.timeout_s)
        if leaving.is_alive():
            log.error("leaving the tensor-parallel group took more than %.0fs; abandoning it", self.watchdog.timeout_s)
            dump_stacks(self._followers)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the followers (``stop`` if not done yet), close their pipes, wait for them or kill them.

        With a rank lost the group is left as it is: tearing down a communicator that a
        collective still waits on can block.
        """
        self.stop()
        self.watchdog.stop()
        deadline = time.monotonic() + timeout
        for proc in self._followers:
            with contextlib.suppress(OSError, ValueError):
                if proc.stdin is not None:
                    proc.stdin.close()
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("tensor-parallel follower %d did not exit within %.0fs; killing it", proc.pid, timeout)
                proc.kill()
                proc.wait()


def dump_stacks(followers: list[subprocess.Popen]) -> None:
    """Every rank's Python stacks into the server's log: where a stuck wait on the group sits.

    Rank 0 writes its own; each live follower writes its own on SIGUSR1 (registered in ``main``).
    """
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    for proc in followers:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGUSR1)
    time.sleep(0.5)  # let them write before they are killed


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the parent (rank 0) dies, even if it could not say stop."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    """A follower rank: join, load the same model's shard, build rank 0's runner, follow rank 0."""
    parser = argparse.ArgumentParser(description="kernelgate tensor-parallel follower (started by the server)")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True, help="the ModelConfig, as JSON")
    parser.add_argument("--max-batch-size", type=int, required=True)
    args = parser.parse_args(argv)
    _die_with_parent()
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s rank{args.rank} %(name)s: %(message)s")
    model = ModelConfig(**json.loads(args.model))
    commands = sys.stdin.buffer
    tp = _join(args.rank, args.world_size, args.port, _backend(model))
    with torch.inference_mode():
        loaded = load_model(model, args.max_batch_size, tp=tp)
        setup = read_command(commands)
        if setup is None:
            log.info("rank %d: rank 0 closed the command pipe before the first step; exiting", args.rank)
            return 1
        if setup[0] != OP_SETUP:
            raise RuntimeError(f"expected the setup command first, got op {setup[0]}")
        num_slots, max_len, graphs = setup[1]
        runner = ModelRunner(loaded.module, loaded.attention, num_slots=num_slots, max_len=max_len,
                             dtype=loaded.dtype, device=loaded.device, use_cuda_graphs=bool(graphs))
        log.info("rank %d runner: %d slots, context %d, CUDA graphs %s", args.rank, num_slots, max_len,
                 "on" if graphs else "off")
        told = follow(runner, commands)
    if not told:
        log.info("rank %d: rank 0 closed the command pipe; exiting without leaving the group", args.rank)
        return 1
    runner.release_graphs()
    _leave()
    log.info("rank %d stopped", args.rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
