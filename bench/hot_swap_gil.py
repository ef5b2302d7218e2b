"""How long a serving thread waits for the GIL while a version loads beside it (CPU, #15 hot swap).

A probe thread stands in for a serving engine thread: it sleeps 1 ms and measures how late it
wakes (waiting for the GIL, and for a core). Meanwhile this process does what a hot swap does on
the loading side, phase by phase: build a mid-size random llama as a Hugging Face module, drop
it and ``gc.collect`` (the garbage ``load_model`` leaves when it converts one), load it
(``load_model``: build, fused decoder), warm it up, collect the young generations (what an engine
loaded beside serving ones does before ``gc.freeze``), ``freeze_startup_objects`` (the start-up
engine's full ``gc.collect`` + ``gc.freeze``), then drop it and ``gc.collect`` (what retiring a version used to do). A
"serving" version's start-up objects are frozen first, as in the server. Each switch interval
runs in its own process, one after the other; per phase: the probe's waits that overlap it (worst,
p99, and the seconds in waits over 5 ms). On a shared machine the numbers are noisy: compare the
settings within one run.

    python bench/hot_swap_gil.py --out /tmp/hot_swap_gil.json
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import write_report  # noqa: E402


def measure(switch_interval: float, layers: int, hidden: int) -> dict:
    import torch

    from common.gc_freeze import freeze_startup_objects
    from inference import model_loader
    from inference.config import ModelConfig
    from inference.model_configs import random_config
    from inference.runner import ModelRunner

    torch.set_num_threads(1)
    waits: list[tuple[float, float]] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            time.sleep(0.001)
            waits.append((started, time.perf_counter() - started - 0.001))

    def mid_size(_name: str):  # noqa: ANN202 - a transformers config
        config = random_config("llama-3.2-1b")
        config.update({"num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": 4 * hidden,
                       "num_attention_heads": hidden // 64, "num_key_value_heads": max(1, hidden // 256),
                       "head_dim": 64, "tie_word_embeddings": True})
        return config

    model_loader.random_config = mid_size
    config = ModelConfig(name="mid", random_config="llama-3.2-1b", device="cpu", dtype="float32",
                         use_deepspeed=False, max_model_len=256)
    freeze_startup_objects()  # the serving version's start-up objects
    threading.Thread(target=probe, daemon=True).start()
    sys.setswitchinterval(switch_interval)
    out: dict[str, dict] = {}

    def phase(name: str, fn):  # noqa: ANN001, ANN202
        started = time.perf_counter()
        result = fn()
        ended = time.perf_counter()
        late = sorted(w for at, w in waits if at < ended and at + 0.001 + w > started)  # waits overlapping it
        out[name] = {"s": round(ended - started, 3), "probe_wakes": len(late),
                     "max_wait_ms": round(1e3 * max(late, default=0.0), 1),
                     "p99_wait_ms": round(1e3 * late[int(0.99 * len(late))], 1) if late else None,
                     "waits_over_5ms_s": round(sum(w for w in late if w > 0.005), 3)}
        return result

    phase("idle", lambda: time.sleep(1.0))
    held = [phase("build_hf_module", lambda: model_loader._build_plain(config, torch.device("cpu"),
                                                                      torch.float32))]
    # A Hugging Face module is cyclic garbage once dropped: only a collection frees it.
    phase("drop_hf_module_and_gc_collect", lambda: (held.clear(), gc.collect()))
    loaded = phase("load_model", lambda: model_loader.load_model(config, 16))

    def warm_up() -> None:
        runner = ModelRunner(loaded.module, loaded.attention, 16, 256, loaded.dtype, loaded.device, False)
        with torch.inference_mode():
            runner.prefill(0, [[1, 2, 3, 4]] * 16)
            runner.decode([5] * 16, [4] * 16)

    phase("warm_up", warm_up)
    # What a version loaded beside serving ones now does at start-up (the young generations,
    # then freeze), then what every engine did before (a full collection, then freeze): the
    # second finds what the first left in the old generation.
    phase("startup_young_collection", lambda: gc.collect(1))
    phase("freeze_startup_objects", freeze_startup_objects)
    held = [loaded]
    del loaded
    # The fused decoder is freed by reference counting; what is left for the collection is small.
    phase("drop_fused_model_and_gc_collect", lambda: (held.clear(), gc.collect()))
    stop.set()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--switch-intervals", type=float, nargs="+", default=[0.005, 0.0005])
    parser.add_argument("--one", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.layers, args.hidden)))
        return 0
    results = {}
    for interval in args.switch_intervals:
        run = subprocess.run([sys.executable, __file__, "--one", str(interval), "--layers", str(args.layers),
                              "--hidden", str(args.hidden)], check=True, capture_output=True, text=True)
        results[f"switch_interval_{interval * 1e3:g}ms"] = json.loads(run.stdout.strip().splitlines()[-1])
    write_report("hot_swap_gil", args.out, {"layers": args.layers, "hidden": args.hidden, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
