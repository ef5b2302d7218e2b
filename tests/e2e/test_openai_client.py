"""The official ``openai`` Python client against the inference server through Envoy (and the sidecar, OPA).

Every option #20 added, streamed and not, parsed by the client's own response models: if
a shape drifted from OpenAI's, the client would fail to parse it or the fields would be
missing here. Errors come back as the client's typed exceptions naming the parameter.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest
import yaml

from tests import procs
from tests.stack import ACME_KEY, AuthzStack

MODEL = "tiny-gpt2"
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"},
                   "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["name", "ok", "n"], "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[AuthzStack]:
    """OPA, the sidecar and Envoy, with the inference server (tiny model) as Envoy's upstream."""
    workdir: Path = tmp_path_factory.mktemp("openai-client")
    stack = AuthzStack(workdir)
    config = workdir / "inference.yaml"
    config.write_text(yaml.safe_dump({"inference": {
        "listen": {"host": "127.0.0.1", "port": stack.upstream_port},
        "model": {"name": MODEL, "random_config": "tiny-gpt2", "device": "cpu", "use_deepspeed": False}}}))
    inference = procs.start("inference", [sys.executable, "-m", "kernelgate.cli", "serve", "--config", str(config)],
                            stack.logs, env={"DS_ACCELERATOR": "cpu"})
    stack.procs["inference"] = inference
    try:
        stack.start_opa()
        stack.start_sidecar()
        stack.start_envoy()
        procs.wait_http(f"http://127.0.0.1:{stack.upstream_port}/readyz", proc=inference, timeout=300)
        yield stack
    finally:
        for proc in reversed(list(stack.procs.values())):
            proc.stop()


@pytest.fixture(scope="module")
def client(stack: AuthzStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=ACME_KEY, max_retries=0, timeout=120)


def test_completion_with_logprobs_echo_n_penalties_and_bias(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0.8, seed=3, n=2,
                                    logprobs=2, echo=True, presence_penalty=0.5, frequency_penalty=0.3,
                                    logit_bias={"66": 2}, extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and [c.index for c in out.choices] == [0, 1]
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == 10
    for choice in out.choices:
        assert choice.text.startswith("Hello")
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
        assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
        assert all(len(top) <= 2 for top in lp.top_logprobs[1:])
    forced = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, logit_bias={"66": 100})
    assert forced.choices[0].text == "BBBB"


def test_completion_stream_with_logprobs_and_usage(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model=MODEL, prompt="Hi", max_tokens=6, temperature=0, logprobs=1,
                                            n=2, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    per_choice: dict[int, list[float]] = {0: [], 1: []}
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            if choice.logprobs is not None:
                per_choice[choice.index] += choice.logprobs.token_logprobs
    assert [len(v) for v in per_choice.values()] == [6, 6] and per_choice[0] == per_choice[1]  # greedy
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_chat_with_logprobs_n_and_json_schema(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=120, n=2, seed=5, logprobs=True, top_logprobs=3,
        presence_penalty=0.2, frequency_penalty=0.2, logit_bias={"67": -5},
        response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}})
    assert len(out.choices) == 2
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        content = choice.logprobs.content
        assert content and all(len(t.top_logprobs) == 3 and t.bytes == list(t.token.encode()) for t in content)
    assert out.usage.completion_tokens == sum(len(c.logprobs.content) for c in out.choices)


def test_chat_stream_with_json_object_and_logprobs(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=300, seed=1, stream=True, logprobs=True,
        response_format={"type": "json_object"}, logit_bias={str(ord('"')): 4, str(ord("}")): 4},
        stream_options={"include_usage": True})
    text, tokens, usage = "", 0, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            tokens += len(choice.logprobs.content) if choice.logprobs else 0
    assert isinstance(json.loads(text), dict)
    assert usage is not None and usage.completion_tokens == tokens


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    from pydantic import BaseModel, Field

    class Thing(BaseModel):
        name: str = Field(max_length=6)
        ok: bool

    out = client.chat.completions.parse(model=MODEL, messages=MESSAGES, max_tokens=120, seed=2,
                                        response_format=Thing)
    assert isinstance(out.choices[0].message.parsed, Thing)


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"n": 0}, "n"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
])
def test_invalid_options_raise_the_clients_bad_request_naming_the_parameter(client: openai.OpenAI, kwargs: dict,
                                                                            param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, **kwargs)
    assert err.value.status_code == 400 and err.value.param == param
