"""The Triton log-probability kernels (inference.triton_logprobs), run in Triton's interpreter on the CPU.

The kernels serve logprobs on CUDA; here they run under ``TRITON_INTERPRET=1`` in a subprocess
(the variable must be set before the kernels are defined, and must not leak into other tests)
and are compared with plain PyTorch: the kernel alone on fp16/fp32 logits, strided rows, ties,
k = 0 and 20; and the sampler with the kernels against the sampler without them, over a mixed batch.
Both kernels are also compiled for the H200 (sm_90), which needs no GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5


def check_kernel() -> None:
    from inference.triton_logprobs import logprob_table

    gen = torch.Generator().manual_seed(0)
    for rows, vocab, k, dtype in [(3, 5000, 5, torch.float16), (2, 259, 20, torch.float32),
                                  (4, 1000, 0, torch.float32), (2, 50257, 3, torch.float32)]:
        wide = torch.randn(rows, vocab + 64, generator=gen) * 3
        logits = wide[:, :vocab].to(dtype) if dtype != torch.float32 else wide[:, :vocab]  # fp32: a strided view
        top = logits[0].max().item() + 1
        logits[0, 9] = logits[0, 7] = top  # a tie at the top of row 0
        choices = torch.randint(0, vocab, (rows,), generator=gen)
        choices[-1] = 9
        table = logprob_table(logits, choices, k)
        reference = logits.float().log_softmax(dim=-1)
        values, ids = reference.topk(k, dim=-1)
        assert table.shape == (rows, 2 + 2 * k) and table.dtype == torch.float32
        assert torch.equal(table[:, 0].long(), choices)
        assert torch.allclose(table[:, 1], reference.gather(1, choices.view(-1, 1)).view(-1), atol=TOL, rtol=0)
        assert torch.allclose(table[:, 2:2 + k], values, atol=TOL, rtol=0)
        assert torch.equal(table[1:, 2 + k:].long(), ids[1:])
        if k:
            assert table[0, 2 + k:2 + k + 2].tolist() == [7.0, 9.0]  # ties: the lower id first
            assert torch.equal(table[0, 2 + k + 2:].long(), ids[0, 2:])


def check_sampler() -> None:
    from inference.generation import SamplingParams
    from inference.sampling import RequestSampler, SlotSampling

    vocab, cpu = 3000, torch.device("cpu")
    fused = SlotSampling(8, vocab, cpu, fused_logprobs=True)
    plain = SlotSampling(8, vocab, cpu, fused_logprobs=False)
    assert fused.fused_logprobs and not plain.fused_logprobs
    options = [{"logprobs": 20}, {}, {"logprobs": 0}, {"logprobs": 3, "presence_penalty": 1.0},
               {"logprobs": 5, "logit_bias": ((11, 50.0),)}]
    samplers = {}
    for name, sampling in (("fused", fused), ("plain", plain)):
        samplers[name] = [RequestSampler(SamplingParams(max_tokens=8, temperature=0.0, **o), cpu) for o in options]
        for slot, sampler in enumerate(samplers[name]):
            sampling.admit(slot, sampler)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        logits = torch.randn(len(options), vocab, generator=gen) * 2
        got = fused.pick(logits, 0, samplers["fused"])
        want = plain.pick(logits, 0, samplers["plain"])
        assert [p.token for p in got] == [p.token for p in want]
        assert got[4].token == 11
        for g, w in zip(got, want):
            assert (g.logprobs is None) == (w.logprobs is None)
            if g.logprobs is not None:
                assert g.logprobs[0] == w.logprobs[0] and abs(g.logprobs[1] - w.logprobs[1]) < TOL
                assert [i for i, _ in g.logprobs[2]] == [i for i, _ in w.logprobs[2]]
                assert all(abs(a - b) < TOL for (_, a), (_, b) in zip(g.logprobs[2], w.logprobs[2]))
        assert len(got[0].logprobs[2]) == 20 and got[2].logprobs[2] == ()


def check_compiles() -> None:
    """Both kernels compile to a cubin for the H200 (sm_90) with Triton's own ptxas: no GPU needed,
    so a kernel that would only fail at the engine's start-up on the device fails here."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from inference import triton_logprobs as t

    common = {"row_stride": "i32", "chunks": "i32", "k": "i32", "max_ptr": "*fp32", "sum_ptr": "*fp32",
              "top_v_ptr": "*fp32", "top_i_ptr": "*i32"}
    for logits in ("*fp16", "*bf16", "*fp32"):
        chunk = ASTSource(fn=t._chunk_kernel, constexprs={"CHUNK": t.CHUNK, "MAX_K": t.MAX_TOP},
                          signature={"logits_ptr": logits, "vocab": "i32", **common,
                                     "CHUNK": "constexpr", "MAX_K": "constexpr"})
        merge = ASTSource(fn=t._merge_kernel, constexprs={"CHUNKS": 32, "CANDIDATES": 512, "MAX_K": t.MAX_TOP},
                          signature={"logits_ptr": logits, "choices_ptr": "*i64", **common, "out_ptr": "*fp32",
                                     "CHUNKS": "constexpr", "CANDIDATES": "constexpr", "MAX_K": "constexpr"})
        for source in (chunk, merge):
            assert triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["cubin"]


@pytest.mark.parametrize("check", ["check_kernel", "check_sampler", "check_compiles"])
def test_against_torch_in_the_triton_interpreter_and_compiled_for_sm90(check: str, tmp_path: Path) -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path)}
    if check != "check_compiles":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", f"from tests.inference.test_triton_logprobs import {check}; {check}()"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_the_cpu_default_is_the_torch_path() -> None:
    from inference.sampling import SlotSampling

    assert not SlotSampling(2, 300, torch.device("cpu")).fused_logprobs
