"""The VLLMEngine adapter's own logic, driven against a stand-in for vLLM 0.32's AsyncLLM, in the main venv.

The main venv has no vLLM (it lives in .venv-vllm), so this test puts a small stand-in package named `vllm`
on sys.modules with the 0.32 names and signatures the adapter uses (AsyncEngineArgs, AsyncLLM.from_engine_args,
generate(prompt, sampling_params, request_id) yielding DELTA RequestOutputs, abort, check_health, shutdown,
the exception classes). What is under test is ours: streaming deltas into GenerationChunks with usage
counts, finish reasons, abort on client disconnect, admission (429), max_model_len (400), error mapping.
The real engine, vLLM's CPU build, is tested by tests/vllm/test_vllm_cpu_*.py (the vLLM stage of tests/run.sh).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import sys
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.engines.base import (
    EngineDeadError,
    EngineSpec,
    GenerationRequest,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
)
from app.engines.grammar.specs import json_object_grammar
from app.engines.vllm.args import VLLM_VERSION
from app.engines.vllm.engine import VLLMEngine


class _VLLMClientError(Exception):
    pass


class _QueueOverflowError(Exception):
    pass


class _EngineDeadError(Exception):
    pass


class _Kind(enum.Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


class _SamplingParams:
    def __init__(self, **kw: Any):
        self.__dict__.update(kw)


@dataclasses.dataclass
class _StructuredOutputsConfig:
    backend: str = "auto"


@dataclasses.dataclass
class _StructuredOutputsParams:
    grammar: str | None = None


@dataclasses.dataclass
class _EngineArgs:
    model: str = ""
    served_model_name: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    structured_outputs_config: _StructuredOutputsConfig | None = None


class _FakeLLM:
    """Emits one token per step: text `w{i} `; `fail` in the prompt's first token id picks an error."""

    instances: list[_FakeLLM] = []

    def __init__(self, args: _EngineArgs):
        self.args = args
        vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
        self.model_config = types.SimpleNamespace(max_model_len=args.max_model_len or 2048, dtype="torch.float32",
                                                  get_vocab_size=lambda: vocab)
        self.params: list[_SamplingParams] = []
        self.priorities: list[int] = []  # as vLLM's priority scheduler orders them: lower first
        self.scheduler_config = types.SimpleNamespace(max_num_seqs=args.max_num_seqs or 256)
        # where vLLM 0.32 keeps its EngineCore processes (app.compat.vllm_engine_core_processes): none here
        self.engine_core = types.SimpleNamespace(
            resources=types.SimpleNamespace(engine_manager=types.SimpleNamespace(processes=[])))
        self.aborted: list[str] = []
        self.raise_next: Exception | None = None
        self.step = asyncio.Event()
        self.step.set()
        self.started = asyncio.Event()
        self.dead = False
        self.shut = False
        _FakeLLM.instances.append(self)

    @classmethod
    def from_engine_args(cls, args: _EngineArgs, stat_loggers: Any = None) -> _FakeLLM:
        return cls(args)

    async def generate(self, prompt: dict, sp: _SamplingParams, request_id: str, priority: int = 0
                       ) -> AsyncIterator[Any]:
        assert prompt["type"] == "token" and prompt["prompt_token_ids"] and sp.output_kind is _Kind.DELTA
        self.priorities.append(priority)
        if self.raise_next is not None:
            exc, self.raise_next = self.raise_next, None
            raise exc
        self.started.set()
        self.params.append(sp)
        for i in range(sp.max_tokens):
            await self.step.wait()
            finish = "length" if i + 1 == sp.max_tokens else None
            # logprobs as vLLM 0.32 sends them: per position, the sampled token and the top k by id
            logprobs = [{100 + i: types.SimpleNamespace(logprob=-1.5), 7: types.SimpleNamespace(logprob=-0.25),
                         8: types.SimpleNamespace(logprob=-3.0)}] if getattr(sp, "logprobs", None) else None
            out = types.SimpleNamespace(text=f"w{i} ", token_ids=[100 + i], finish_reason=finish, logprobs=logprobs)
            yield types.SimpleNamespace(outputs=[out], finished=finish is not None)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def check_health(self) -> None:
        if self.dead:
            raise _EngineDeadError("EngineCore encountered an issue.")

    def shutdown(self) -> None:
        self.shut = True


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> type[_FakeLLM]:
    mods = {name: types.ModuleType(name) for name in (
        "vllm", "vllm.config", "vllm.engine", "vllm.engine.arg_utils", "vllm.exceptions", "vllm.sampling_params",
        "vllm.v1", "vllm.v1.engine", "vllm.v1.engine.async_llm", "vllm.v1.engine.exceptions", "vllm.platforms")}
    mods["vllm"].__version__ = VLLM_VERSION  # type: ignore[attr-defined]
    mods["vllm.engine.arg_utils"].AsyncEngineArgs = _EngineArgs  # type: ignore[attr-defined]
    mods["vllm.exceptions"].QueueOverflowError = _QueueOverflowError  # type: ignore[attr-defined]
    mods["vllm.exceptions"].VLLMClientError = _VLLMClientError  # type: ignore[attr-defined]
    mods["vllm.sampling_params"].RequestOutputKind = _Kind  # type: ignore[attr-defined]
    mods["vllm.sampling_params"].SamplingParams = _SamplingParams  # type: ignore[attr-defined]
    mods["vllm.sampling_params"].StructuredOutputsParams = _StructuredOutputsParams  # type: ignore[attr-defined]
    mods["vllm.config"].StructuredOutputsConfig = _StructuredOutputsConfig  # type: ignore[attr-defined]
    mods["vllm.v1.engine.async_llm"].AsyncLLM = _FakeLLM  # type: ignore[attr-defined]
    mods["vllm.v1.engine.exceptions"].EngineDeadError = _EngineDeadError  # type: ignore[attr-defined]
    mods["vllm.platforms"].current_platform = types.SimpleNamespace(  # type: ignore[attr-defined]
        device_type="cuda", is_cpu=lambda: False)
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    _FakeLLM.instances.clear()
    return _FakeLLM


def _engine(tiny_model: Path, **kwargs: Any) -> VLLMEngine:
    spec = EngineSpec(model_id="tiny", model_source=str(tiny_model), engine="vllm",
                      max_waiting=kwargs.pop("max_waiting", 0),
                      engine_kwargs={"max_model_len": 64, "max_num_seqs": 1, **kwargs}, default_max_tokens=5)
    return VLLMEngine(spec, reason="configured: test")


async def _collect(agen: AsyncIterator[Any]) -> list[Any]:
    return [c async for c in agen]


def test_streams_deltas_with_usage_and_finish(fake_vllm: type[_FakeLLM], tiny_model: Path) -> None:
    async def main() -> None:
        engine = _engine(tiny_model)
        await engine.start()
        assert engine.is_ready() and engine.info.engine == "vllm" and engine.info.max_context == 64
        assert engine.info.dtype == "float32" and engine._admission.max_running == 1 and engine.info.device == "cuda"
        llm = fake_vllm.instances[0]
        assert (llm.args.model, llm.args.served_model_name) == (str(tiny_model), "tiny")
        chunks = await _collect(engine.generate(GenerationRequest(prompt="hello world", max_tokens=3)))
        n_prompt = await engine.count_prompt_tokens(GenerationRequest(prompt="hello world"))
        assert "".join(c.text for c in chunks) == "w0 w1 w2 "
        assert [c.completion_tokens for c in chunks] == [1, 2, 3]
        assert {c.prompt_tokens for c in chunks} == {n_prompt}
        assert [c.finish_reason for c in chunks] == [None, None, "length"]
        default = await _collect(engine.generate(GenerationRequest(messages=[{"role": "user", "content": "x"}])))
        assert default[-1].completion_tokens == 5  # default_max_tokens
        with pytest.raises(PromptTooLongError, match="at most"):
            await _collect(engine.generate(GenerationRequest(prompt="hello", max_tokens=64)))
        assert llm.aborted == []
        # batch traffic (service_tier flex) reaches vLLM's own queue behind interactive requests
        await _collect(engine.generate(GenerationRequest(prompt="hello", max_tokens=2, priority="batch")))
        assert llm.priorities[-1] == 1 and set(llm.priorities[:-1]) == {0}
        await engine.shutdown()
        assert llm.shut and not engine.is_ready()

    asyncio.run(main())


def test_grammar_and_logprobs_reach_vllm_and_come_back_as_token_logprobs(fake_vllm: type[_FakeLLM],
                                                                         tiny_model: Path) -> None:
    async def main() -> None:
        engine = _engine(tiny_model)
        await engine.start()
        llm = fake_vllm.instances[0]
        assert llm.args.structured_outputs_config == _StructuredOutputsConfig(backend="xgrammar")
        spec = json_object_grammar()
        chunks = await _collect(engine.generate(GenerationRequest(prompt="hi", max_tokens=2, grammar=spec,
                                                                  logprobs=1)))
        sp = llm.params[-1]
        assert sp.structured_outputs == _StructuredOutputsParams(grammar=spec.ebnf) and sp.logprobs == 1
        entries = [e for c in chunks for e in c.logprobs or []]
        assert [(e.chosen.token_id, e.chosen.logprob) for e in entries] == [(100, -1.5), (101, -1.5)]
        assert [[(t.token_id, t.logprob) for t in e.top] for e in entries] == [[(7, -0.25)], [(7, -0.25)]]
        assert entries[0].chosen.token_bytes and entries[0].chosen.token  # texts from the tokenizer's bytes
        plain = await _collect(engine.generate(GenerationRequest(prompt="hi", max_tokens=1)))
        assert plain[0].logprobs is None and not hasattr(llm.params[-1], "structured_outputs")
        await engine.shutdown()

    asyncio.run(main())


def test_client_disconnect_aborts_in_vllm_and_queue_full_is_429(fake_vllm: type[_FakeLLM], tiny_model: Path) -> None:
    async def main() -> None:
        engine = _engine(tiny_model)  # max_num_seqs 1, max_waiting 0
        await engine.start()
        llm = fake_vllm.instances[0]
        llm.step.clear()  # hold generation after the first request is admitted
        llm.started.clear()  # the warm-up set it; the prompt is rendered in a thread before the request starts
        req = GenerationRequest(prompt="a", max_tokens=10)
        stream = engine.generate(req)
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.wait_for(llm.started.wait(), 10)
        assert engine.stats().running == 1
        with pytest.raises(QueueFullError) as exc:
            await _collect(engine.generate(GenerationRequest(prompt="b", max_tokens=2)))
        assert exc.value.status_code == 429
        llm.step.set()
        assert (await first).text == "w0 "
        await stream.aclose()  # what the API layer does when the client goes away
        assert len(llm.aborted) == 1 and llm.aborted[0].startswith(req.request_id + "-")
        assert engine.stats().running == 0

    asyncio.run(main())


def test_vllm_errors_map_to_our_errors(fake_vllm: type[_FakeLLM], tiny_model: Path) -> None:
    async def main() -> None:
        engine = _engine(tiny_model, max_num_seqs=4)
        await engine.start()
        llm = fake_vllm.instances[0]
        for raised, ours in ((_QueueOverflowError("full"), QueueFullError),
                             (_VLLMClientError("bad"), InvalidRequestError),
                             (_EngineDeadError("gone"), EngineDeadError)):
            llm.raise_next = raised
            with pytest.raises(ours):
                await _collect(engine.generate(GenerationRequest(prompt="a", max_tokens=2)))
        assert not engine.is_ready()  # a dead vLLM engine makes the model not ready
        with pytest.raises(EngineDeadError):
            await engine.check_health()

    asyncio.run(main())


def test_health_check_reports_a_dead_engine_core(fake_vllm: type[_FakeLLM], tiny_model: Path) -> None:
    async def main() -> None:
        engine = _engine(tiny_model)
        await engine.start()
        await engine.check_health()
        fake_vllm.instances[0].dead = True
        with pytest.raises(EngineDeadError, match="is dead"):
            await engine.check_health()
        assert not engine.is_ready()

    asyncio.run(main())


def test_unknown_engine_kwargs_fail_the_start(fake_vllm: type[_FakeLLM], tiny_model: Path) -> None:
    with pytest.raises(ValueError, match=r"\['not_an_arg'\] are not AsyncEngineArgs fields"):
        asyncio.run(_engine(tiny_model, not_an_arg=1).start())
