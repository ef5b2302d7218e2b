"""The statistics and the trace ids of bench/tracing_gpu.py, which settle the cost of kernel tracing."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

from otel.kernels.selection import in_ratio

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("tracing_gpu_bench", ROOT / "bench" / "tracing_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


bench = _bench()


def test_stratified_trace_ids_put_exactly_one_request_in_each_block_inside_the_ratio() -> None:
    for ratio in (0.001, 0.01, 0.1):
        ids = bench.TraceIds(ratio, stratified=True, rng=random.Random(3))
        block = round(1 / ratio)
        inside = [in_ratio(ids.next(), ratio) for _ in range(block * 7)]
        assert [sum(inside[i:i + block]) for i in range(0, len(inside), block)] == [1] * 7
        assert ids.inside == 7
        assert len({i % block for i, hit in enumerate(inside) if hit}) > 1, "a random place in each block"


def test_random_trace_ids_fall_inside_the_ratio_by_chance() -> None:
    ids = bench.TraceIds(0.01, stratified=False, rng=random.Random(3))
    hits = sum(in_ratio(ids.next(), 0.01) for _ in range(20000))
    assert 140 < hits < 260


def test_pooled_loss_is_the_loss_of_the_summed_rounds_with_an_interval_that_narrows() -> None:
    rng = random.Random(5)

    def rounds(n: int) -> list[tuple[float, float]]:
        out = []
        for _ in range(n):
            base = 5000 * rng.gauss(1.0, 0.03)
            out.append((base, base * (1 - 0.02) * rng.gauss(1.0, 0.02)))
        return out

    few, many = bench.pooled_loss([rounds(8)]), bench.pooled_loss([rounds(60), rounds(60)])
    assert few["rounds"] == 8 and many["rounds"] == 120
    assert many["interval90"][0] < 2.0 < many["interval90"][1]
    assert many["halfwidth"] < few["halfwidth"]
    exact = bench.pooled_loss([[(100.0, 97.0), (200.0, 195.0)]])
    assert exact["overhead_pct"] == round(100 * 8 / 300, 2)


def test_resampling_the_runs_too_widens_the_interval_when_runs_disagree() -> None:
    rng = random.Random(9)

    def run(loss: float, n: int = 20) -> list[tuple[float, float]]:
        return [(base, base * (1 - loss) * rng.gauss(1.0, 0.005)) for base in (5000 * rng.gauss(1.0, 0.01)
                                                                                for _ in range(n))]

    agreeing = bench.pooled_loss([run(0.02), run(0.02), run(0.02)])
    disagreeing = bench.pooled_loss([run(0.0), run(0.02), run(0.06)])
    assert agreeing["runs"] == disagreeing["runs"] == 3
    lo, hi = disagreeing["interval90_runs_resampled"]
    # within fixed runs the interval is narrow; resampling runs reaches towards the outlying runs
    assert hi - lo > 3 * (disagreeing["interval90"][1] - disagreeing["interval90"][0])
    assert lo < 2.0 and hi > 4.0
    a_lo, a_hi = agreeing["interval90_runs_resampled"]
    assert a_hi - a_lo < 1.0 and a_lo < 2.0 < a_hi
