"""LoRA adapters on the transformers engine (`app.engines.hf.peft_rows` through `TransformersEngine`).

The reference is PEFT's own merged model (`PeftModel.from_pretrained(...).merge_and_unload()`) decoding greedily
one token at a time: a request with adapter A gives the same greedy tokens while it shares decode steps with
requests of adapter B and of no adapter. Loading on first use, least-recently-used eviction at
`max_num_adapters_per_replica`, an adapter copied in while serving, and bad adapters (4xx, the engine keeps
serving) are checked on the same engine.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from app.engines.base import (
    EngineError,
    EngineSpec,
    GenerationRequest,
    InvalidRequestError,
    LoraConfig,
    ModelNotFoundError,
)
from app.engines.hf.engine import TransformersEngine
from app.metrics import PrometheusSink

pytestmark = pytest.mark.slow

TOKENS = 10
PROMPTS = ["hello world", "The quick brown fox jumps over the lazy dog", "ray serve replicas"]


@pytest.fixture(scope="module")
def adapters(tiny_loras: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for name in ("A", "B", "C"):
        shutil.copytree(tiny_loras / name, root / name)
    return root


@pytest.fixture(scope="module")
def engine(tiny_model: Path, adapters: Path) -> Iterator[TransformersEngine]:
    spec = EngineSpec(model_id="tiny", model_source=str(tiny_model), engine="transformers",
                      engine_kwargs={"engine_process": False, "device": "cpu", "max_num_seqs": 8, "max_lora_rank": 8},
                      lora_config=LoraConfig(dynamic_lora_loading_path=str(adapters), max_num_adapters_per_replica=2))
    eng = TransformersEngine(spec, PrometheusSink())
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.shutdown())


def _request(prompt: str, adapter: str | None) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, max_tokens=TOKENS, temperature=0.0, ignore_eos=True, logprobs=0,
                             adapter=adapter)


async def _tokens(engine: TransformersEngine, prompt: str, adapter: str | None) -> list[int]:
    out: list[int] = []
    async for chunk in engine.generate(_request(prompt, adapter)):
        out += [entry.chosen.token_id for entry in chunk.logprobs or []]
    return out


def _greedy(model: Any, prompt_ids: list[int]) -> list[int]:
    ids = list(prompt_ids)
    with torch.inference_mode():
        for _ in range(TOKENS):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(torch.argmax(logits)))
    return ids[len(prompt_ids):]


def _reference(tiny_model: Path, adapter: Path | None) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return base if adapter is None else PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()


def _counter(engine: TransformersEngine, name: str, adapter: str) -> float:
    text = engine.metrics.render()[0].decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and s.labels.get("adapter") == adapter)


def test_greedy_tokens_equal_peft_merged_models_in_a_batch_mixing_adapters(engine: TransformersEngine,
                                                                          tiny_model: Path, adapters: Path) -> None:
    plan = [(p, a) for p in PROMPTS for a in ("A", None, "B")]

    async def all_at_once() -> list[list[int]]:
        return await asyncio.gather(*(_tokens(engine, p, a) for p, a in plan))

    steps = engine._scheduler.steps if engine._scheduler else 0
    got = dict(zip(plan, asyncio.run(all_at_once()), strict=True))
    assert engine._scheduler is not None and engine._scheduler.steps - steps < TOKENS * 3  # they shared steps
    for adapter in ("A", None, "B"):
        model = _reference(tiny_model, adapters / adapter if adapter else None)
        for prompt in PROMPTS:
            ids = engine.runner.prompt_ids(_request(prompt, adapter))
            assert got[(prompt, adapter)] == _greedy(model, ids), (prompt, adapter)
    for prompt in PROMPTS:  # the adapters change the output
        assert len({tuple(got[(prompt, a)]) for a in ("A", None, "B")}) == 3, prompt
    assert _counter(engine, "llm_lora_requests_total", "A") == len(PROMPTS)
    assert _counter(engine, "llm_lora_output_tokens_total", "B") == len(PROMPTS) * TOKENS


def test_loaded_on_first_use_once_and_evicted_least_recently_used(engine: TransformersEngine) -> None:
    assert engine.adapters is not None
    loads = {n: _counter(engine, "llm_lora_adapter_loads_total", n) for n in "ABC"}
    evictions = {n: _counter(engine, "llm_lora_adapter_evictions_total", n) for n in "ABC"}
    asyncio.run(_tokens(engine, "x", "A"))
    asyncio.run(_tokens(engine, "x", "B"))
    asyncio.run(_tokens(engine, "x", "A"))  # B is now the least recently used
    assert engine.adapters.names() == ["B", "A"]
    asyncio.run(_tokens(engine, "x", "C"))  # a third adapter: B goes (the limit is 2)
    assert engine.adapters.names() == ["A", "C"]
    assert _counter(engine, "llm_lora_adapter_evictions_total", "B") == evictions["B"] + 1
    assert _counter(engine, "llm_lora_adapter_loads_total", "A") == loads["A"] + (0 if loads["A"] else 1)
    assert _counter(engine, "llm_lora_adapter_loads_total", "C") == loads["C"] + 1
    # the evicted adapter loads again and gives the same tokens as before
    again = asyncio.run(_tokens(engine, "hello world", "B"))
    assert again == asyncio.run(_tokens(engine, "hello world", "B"))
    assert _counter(engine, "llm_lora_adapter_loads_total", "B") == loads["B"] + 1


def test_a_request_for_a_third_adapter_waits_while_two_are_in_use(engine: TransformersEngine) -> None:
    async def scenario() -> list[list[int]]:
        long = [asyncio.create_task(_tokens_n(engine, p, a, 40)) for p, a in (("a", "A"), ("b", "C"))]
        await asyncio.sleep(0)
        third = asyncio.create_task(_tokens(engine, "x", "B"))  # neither A nor C may go while in use
        return await asyncio.gather(*long, third)

    results = asyncio.run(scenario())
    assert [len(r) for r in results] == [40, 40, TOKENS]


async def _tokens_n(engine: TransformersEngine, prompt: str, adapter: str, n: int) -> list[int]:
    out: list[int] = []
    request = GenerationRequest(prompt=prompt, max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=0,
                                adapter=adapter)
    async for chunk in engine.generate(request):
        out += [entry.chosen.token_id for entry in chunk.logprobs or []]
    return out


def test_an_adapter_copied_in_while_serving_is_served(engine: TransformersEngine, adapters: Path) -> None:
    assert "D" not in engine.adapter_ids()
    shutil.copytree(adapters / "A", adapters / "D")
    assert "D" in engine.adapter_ids()
    assert asyncio.run(_tokens(engine, "hello world", "D")) == asyncio.run(_tokens(engine, "hello world", "A"))


def test_bad_adapters_are_4xx_and_the_engine_keeps_serving(engine: TransformersEngine, adapters: Path) -> None:
    shutil.copytree(adapters / "A", adapters / "corrupt")
    (adapters / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    shutil.copytree(adapters / "A", adapters / "big")
    cfg = json.loads((adapters / "big" / "adapter_config.json").read_text())
    (adapters / "big" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 16}))
    cases: list[tuple[str, type[EngineError], str]] = [
        ("nope", ModelNotFoundError, "model 'tiny:nope' does not exist"),
        ("../A", InvalidRequestError, "an adapter name is a folder name"),
        ("corrupt", InvalidRequestError, "adapter tiny:corrupt cannot be served: adapter_model.safetensors is corrupt"),
        ("big", InvalidRequestError, "its rank 16 is above max_lora_rank 8"),
    ]
    for name, error, message in cases:
        with pytest.raises(error) as err:
            asyncio.run(_tokens(engine, "x", name))
        assert message in err.value.message
    assert len(asyncio.run(_tokens(engine, "x", None))) == TOKENS
    assert len(asyncio.run(_tokens(engine, "x", "A"))) == TOKENS
