"""#15 hot swap: what a version loading beside a serving one costs the serving one.

The grammar tables are built once per tokenizer and shared by the versions (``GrammarTables``);
a loading version's start-up chunks and validation steps yield to the busy serving engines
(``inference.pacing.LoadPacer``). No timing asserts: the tests count builds and pauses and check
their order against the serving engine's step count.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from inference.engine import Engine
from inference.generation import GenerationRequest, SamplingParams
from inference.metrics import InferenceMetrics
from inference.pacing import LoadPacer
from inference.structured import GrammarTables, tokenizer_key
from inference.tracing import Tracing
from tests.inference.helpers import tiny_config, wait_until

pytest.importorskip("llguidance")


def _engine(config, **kwargs) -> Engine:  # noqa: ANN001 - an InferenceConfig
    return Engine(config.model, config.batching, InferenceMetrics(CollectorRegistry()), Tracing(), **kwargs)


def _wait_ready(engine: Engine, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not engine.ready:
        assert engine.failure is None, f"engine failed: {engine.failure!r}"
        assert time.monotonic() < deadline, "engine did not become ready"
        time.sleep(0.02)


# -- grammar tables -------------------------------------------------------------------------------


def test_grammar_tables_are_built_once_per_key_even_when_asked_at_once() -> None:
    tables = GrammarTables()
    built: list[str] = []
    gate = threading.Event()

    def build(name: str):  # noqa: ANN202 - a stand-in for Grammars
        def run() -> object:
            gate.wait(5)
            built.append(name)
            return object()
        return run

    results: list[tuple[object, bool]] = []
    threads = [threading.Thread(target=lambda: results.append(tables.get("a", build("a")))) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.05)  # all four are in get(); one builds, three wait for it
    gate.set()
    for thread in threads:
        thread.join(10)
    assert built == ["a"] and tables.builds == 1
    assert len({id(t) for t, _ in results}) == 1 and sorted(shared for _, shared in results) == [False, True, True, True]
    other, shared = tables.get("b", build("b"))
    assert not shared and other is not results[0][0] and tables.builds == 2
    none, _ = tables.get("c", lambda: None)  # no constrained decoding for that tokenizer: kept as such
    assert none is None and tables.get("c", build("c")) == (None, True) and tables.builds == 3


def test_tokenizer_key_follows_the_tokenizer_files_not_the_directory(tmp_path: Path) -> None:
    for name, content in (("a", "{}"), ("b", "{}"), ("c", '{"other": 1}')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text(content)
    assert tokenizer_key(str(tmp_path / "a"), 100, (1,)) == tokenizer_key(str(tmp_path / "b"), 100, (1,))
    assert tokenizer_key(str(tmp_path / "a"), 100, (1,)) != tokenizer_key(str(tmp_path / "c"), 100, (1,))
    assert tokenizer_key(None, 100, (1,)) == tokenizer_key(None, 100, (1,))
    assert tokenizer_key(None, 100, (1,)) != tokenizer_key(None, 101, (1,))  # the vocabulary size counts
    assert tokenizer_key(None, 100, (1,)) != tokenizer_key(None, 100, (2,))  # and the end-of-sequence ids


def test_a_second_version_of_one_tokenizer_shares_the_grammar_tables() -> None:
    config = tiny_config()
    tables = GrammarTables()
    v1 = _engine(config, grammar_tables=tables)
    v1.start()
    _wait_ready(v1)
    v2 = _engine(config, grammar_tables=tables, beside_serving=True)
    v2.start()
    try:
        _wait_ready(v2)
        assert v1.info.grammars is not None and v2.info.grammars is v1.info.grammars
        assert tables.builds == 1
    finally:
        v2.shutdown(10)
        v1.shutdown(10)


# -- pacing -----------------------------------------------------------------------------------------


@dataclass
class _Stats:
    waiting: int
    running: int
    steps: int


class _FakeServing:
    """A serving engine whose step count goes up only when the test says so."""

    def __init__(self, running: int) -> None:
        self.running = running
        self.steps = 0

    def stats(self) -> _Stats:
        return _Stats(0, self.running, self.steps)


def test_a_pause_waits_for_a_step_of_each_busy_serving_engine() -> None:
    busy, idle = _FakeServing(running=2), _FakeServing(running=0)
    slept: list[float] = []

    def sleep(seconds: float) -> None:  # the serving engine steps while the loader sleeps
        slept.append(seconds)
        if len(slept) == 3:
            busy.steps += 1

    pacer = LoadPacer(lambda: [busy, idle], share=0.0, max_pause_s=60.0, sleep=sleep)
    pacer.pause(0.01, "capture")
    assert len(slept) == 3 and pacer.pauses == 1 and pacer.stepped == [True]
    assert pacer.chunks[0][:2] == ("capture", 0.01)


def test_a_pause_is_skipped_when_nothing_serves_and_after_stop() -> None:
    idle = _FakeServing(running=0)
    pacer = LoadPacer(lambda: [idle], max_pause_s=60.0, sleep=lambda s: pytest.fail("must not wait"))
    assert pacer.pause(1.0) == 0.0 and pacer.pauses == 0
    busy = _FakeServing(running=1)
    pacer = LoadPacer(lambda: [busy], max_pause_s=60.0, sleep=lambda s: pytest.fail("must not wait"))
    pacer.stop()
    assert pacer.pause(1.0) == 0.0 and pacer.pauses == 0 and not pacer.active


def test_a_pause_never_outlasts_its_cap() -> None:
    stuck = _FakeServing(running=1)  # never steps
    pacer = LoadPacer(lambda: [stuck], max_pause_s=0.01)
    pacer.pause(5.0)
    assert pacer.stepped == [False] and pacer.pauses == 1


def test_a_listing_that_changes_under_the_pacer_means_no_pause() -> None:
    def changing() -> list:
        raise RuntimeError("dictionary changed size during iteration")

    pacer = LoadPacer(changing, sleep=lambda s: pytest.fail("must not wait"))
    assert pacer.pause(1.0) == 0.0


async def test_a_loading_version_yields_to_the_serving_one_between_its_start_up_chunks() -> None:
    """v1 serves one long generation while v2 starts beside it with a pacer: v2's start-up pauses
    after every chunk (load, warm-up prefill and decode, gc freeze, sampler, grammars), and during
    every pause v1 finished at least one step (the cap is far away, so this is about order, not time).
    Then v2's own steps (probe, shadow run) are paced until the pacer stops."""
    config = tiny_config()
    tables = GrammarTables()
    v1 = _engine(config, grammar_tables=tables)
    v1.start()
    _wait_ready(v1)
    stream = v1.submit(GenerationRequest(request_id=uuid.uuid4().hex, prompt_token_ids=(1, 2, 3),
                                         params=SamplingParams(max_tokens=100_000, temperature=0.0,
                                                               ignore_eos=True)))
    first = await stream.__anext__()
    assert first.token_ids

    pacer = LoadPacer(lambda: [v1], max_pause_s=120.0)
    v2 = _engine(config, grammar_tables=tables, pacer=pacer)
    drained = asyncio.ensure_future(_drain(stream))
    try:
        v2.start()
        await asyncio.get_running_loop().run_in_executor(None, _wait_ready, v2)
        what = [w for w, _, _ in pacer.chunks]
        assert what[:6] == ["load", "warm-up prefill", "warm-up decode", "gc freeze", "sampler", "grammars"], what
        assert all(pacer.stepped) and pacer.pauses == len(pacer.chunks) >= 6
        assert tables.builds == 1  # v2 took v1's grammar tables
        # v2's own steps (a probe, a shadow run) yield too, while the pacer runs
        before = pacer.pauses
        probe = v2.submit(GenerationRequest(request_id=uuid.uuid4().hex, prompt_token_ids=(4, 5, 6),
                                            params=SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)))
        assert len([o async for o in probe]) == 4
        # a prefill and three decode steps: the last pause follows the last output's delivery
        await wait_until(lambda: pacer.pauses - before >= 4, 60)
        assert pacer.pauses - before == 4 and all(pacer.stepped)
        assert v2.paused_s == pytest.approx(pacer.paused_s)
        pacer.stop()
        after = v2.submit(GenerationRequest(request_id=uuid.uuid4().hex, prompt_token_ids=(4, 5, 6),
                                            params=SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)))
        assert len([o async for o in after]) == 4
        assert pacer.pauses - before == 4  # stopped: no more pauses
    finally:
        stream.cancel()
        v1.abort(stream.request_id)
        drained.cancel()
        v2.shutdown(10)
        v1.shutdown(10)


async def _drain(stream) -> None:  # noqa: ANN001 - a RequestStream
    async for _ in stream:
        pass
