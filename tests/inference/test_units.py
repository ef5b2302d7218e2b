"""Small pieces on their own: config, protocol parsing, stop strings, detokenizer, scheduler slots."""

from __future__ import annotations

import pytest

from common.settings import ConfigError, build
from inference.config import BatchingConfig, InferenceConfig
from inference.demo_tokenizer import build_demo_tokenizer
from inference.detokenize import IncrementalDetokenizer, StopStringFilter
from inference.generation import GenerationRequest, QueueFullError, SamplingParams
from inference.runner import batch_buckets, kv_bucket
from inference.openai import protocol
from inference.openai.chat.protocol import parse_chat_request
from inference.openai.completion.protocol import DEFAULT_MAX_TOKENS, parse_completion_request
from inference.scheduler import Scheduler, Sequence


def test_config_builds_from_yaml_data_and_names_bad_keys() -> None:
    config = build(InferenceConfig, {"listen": {"port": 9000}, "model": {"name": "m", "device": "cpu"},
                                     "batching": {"max_batch_size": 4, "max_wait_ms": 1}}, "inference")
    assert config.listen.port == 9000 and config.batching.max_batch_size == 4 and config.model.device == "cpu"
    with pytest.raises(ConfigError, match="inference.model.device"):
        build(InferenceConfig, {"model": {"device": "tpu"}}, "inference")
    with pytest.raises(ConfigError, match="max_batch_size must be >= 1"):
        build(InferenceConfig, {"batching": {"max_batch_size": 0}}, "inference")
    with pytest.raises(ConfigError, match="inference.limits.max_body"):
        build(InferenceConfig, {"limits": {"max_body": 1}}, "inference")


def test_protocol_parsing() -> None:
    parsed = parse_completion_request({"model": "m", "prompt": ["a", "b"], "stop": "x", "n": 1,
                                                "user": "ignored", "presence_penalty": 0})
    assert parsed.prompts == ("a", "b") and parsed.sampling.stop == ("x",)
    assert parsed.sampling.max_tokens == DEFAULT_MAX_TOKENS
    chat = parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                        "max_completion_tokens": 5})
    assert chat.sampling.max_tokens == 5
    with pytest.raises(protocol.RequestError) as err:
        parse_completion_request({"model": "m", "prompt": "x", "stream_options": {"include_usage": True}})
    assert err.value.param == "stream_options"
    with pytest.raises(protocol.RequestError) as err:
        protocol.parse_json(b"[1, 2]")
    assert err.value.status == 400


def test_stop_filter_holds_back_possible_stop_prefixes() -> None:
    f = StopStringFilter(("STOP",))
    assert f.push("abc S") == "abc "
    assert f.push("T") == ""
    assert f.push("x") == "STx"
    assert f.push("yST") == "y"
    assert f.push("OP and more") == ""
    assert f.stopped and f.flush() == ""
    g = StopStringFilter(("zz",))
    assert g.push("az") == "a" and g.flush() == "z"


def test_incremental_detokenizer_waits_for_whole_characters() -> None:
    tokenizer = build_demo_tokenizer()
    detok = IncrementalDetokenizer(tokenizer.backend_tokenizer, len(tokenizer))
    pieces = [detok.add(b) for b in "héllo €".encode()]
    assert "".join(pieces) == "héllo €"
    assert pieces[1] == "" and pieces[2] == "é"
    assert detok.add(1000) == ""  # outside the tokenizer's vocabulary: skipped


def _seq(request_id: str, prompt_len: int, max_tokens: int) -> Sequence:
    request = GenerationRequest(request_id, tuple(range(prompt_len)), SamplingParams(max_tokens=max_tokens))
    return Sequence(request=request, sink=None, enqueued_ns=0, enqueued_wall_ns=0,
                    token_ids=list(request.prompt_token_ids))


def test_scheduler_admission_bounds_and_dense_slots() -> None:
    scheduler = Scheduler(BatchingConfig(max_batch_size=3, max_tokens_in_flight=100, max_wait_ms=0, max_queue=2),
                          max_prefill_tokens=1000)
    seqs = [_seq(str(i), 10, 20) for i in range(5)]
    for seq in seqs:
        scheduler.add([seq])
    with pytest.raises(QueueFullError):
        scheduler.add([_seq("x", 1, 1)])
    admitted = scheduler.admit(now_ns=1)
    assert [s.request_id for s in admitted] == ["0", "1", "2"] and [s.slot for s in admitted] == [0, 1, 2]
    assert scheduler.tokens_in_flight == 90
    move = scheduler.finish(seqs[0])
    assert (move.src, move.dst) == (2, 0) and seqs[2].slot == 0
    assert scheduler.finish(seqs[2]) is not None and seqs[1].slot == 0
    assert [s.request_id for s in scheduler.admit(now_ns=2)] == ["3", "4"]
    assert [s.slot for s in scheduler.running] == [0, 1, 2]


def test_scheduler_waits_briefly_to_batch_a_burst() -> None:
    scheduler = Scheduler(BatchingConfig(max_batch_size=4, max_wait_ms=5, max_queue=4), max_prefill_tokens=1000)
    scheduler.add([_seq("a", 3, 3)])
    assert scheduler.admit(now_ns=1_000_000) == []
    assert 0 < scheduler.wait_timeout_s(now_ns=1_000_000) <= 0.005
    assert len(scheduler.admit(now_ns=6_000_000)) == 1


def test_buckets() -> None:
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_buckets(3) == [1, 2, 3]
    assert [kv_bucket(n, 1024) for n in (1, 64, 65, 300, 2000)] == [64, 64, 128, 512, 1024]


def test_nan_and_infinity_are_rejected_as_invalid_json() -> None:
    import pytest

    from inference.openai.protocol import RequestError, parse_json

    for body in (b'{"max_tokens": NaN}', b'{"temperature": Infinity}', b'{"top_p": -Infinity}', b'{"seed": 1e400}'):
        with pytest.raises(RequestError, match="not valid JSON"):
            parse_json(body)
