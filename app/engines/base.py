"""The engine protocol: the one small contract every inference engine implements, and the data it uses.

An engine is built from an `EngineSpec` (what to serve, from a model config or the LLM_* settings) and
turns a `GenerationRequest` into an async stream of `GenerationChunk`s. Closing (or cancelling) that
stream aborts the generation: that is how client disconnects reach the engine. Every error, admission
(429) and validation (400) included, is raised when the first chunk is asked for, never at call time.
Engines raise `EngineError` subclasses, whose HTTP status and OpenAI error type the API layer maps
without knowing engines. `EngineInfo` is what an engine reports about itself; it and the errors are
plain picklable data, so they cross Ray and torch.distributed boundaries unchanged.

`ServingKnobs` declares, once, the per-model knobs every config source shares (`LLM_*` settings, model
config files, `DS_*` settings, `EngineSpec`).
"""

from __future__ import annotations

import abc
import os
import re
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

FinishReason = Literal["stop", "length"]
GrammarKind = Literal["json_schema", "json_object", "tool_calls"]
EngineChoice = Literal["auto", "vllm", "transformers"]


class ServingKnobs(BaseModel):
    """Per-model serving knobs, declared once; Settings (LLM_*), model configs, EngineSpec and DSSettings reuse them."""

    max_waiting: int = Field(default=32, ge=0, description="Requests queued per engine (per replica) before 429.")
    default_max_tokens: int = Field(default=256, ge=1, description="max_tokens for a request that sets none.")
    retry_after_s: float = Field(default=1.0, ge=0, description="Retry-After (seconds) sent with a 429.")
    tool_call_parser: str = Field(default="hermes", min_length=1, description="How the model writes tool calls, "
                                  "by vLLM's parser names (hermes: Qwen2.5, Qwen3, Hermes 2 Pro).")


def missing_local_model(source: str) -> str | None:
    """Why `source` cannot load, when it is plainly a local folder that is not there; None otherwise.

    A hub id is `name` or `org/name` and never starts with '.', '/' or '~' (huggingface_hub's rule), so such a
    source, or one with more than one '/', is a path: without this check a missing folder reaches the hub client
    and fails with "Repo id must use alphanumeric chars", which names neither the folder nor the fix.
    """
    expanded = os.path.expanduser(source)
    if os.path.isdir(expanded) or not (source.startswith((".", "/", "~")) or source.count("/") > 1):
        return None
    what = "is a file, not a model folder" if os.path.exists(expanded) else "does not exist"
    return (f"{source!r} is a local path (a hub id is 'name' or 'org/name') and {what} "
            f"(resolved: {os.path.abspath(expanded)}); build the tiny one with `python -m app make-tiny-model "
            "DIR` or pass an existing folder or a hub id")


class LoraConfig(BaseModel):
    """Multi-LoRA serving of one base model, in Ray Serve LLM's `lora_config` layout (its key names).

    Adapters are PEFT folders (`adapter_config.json` + `adapter_model.safetensors`) directly under
    `dynamic_lora_loading_path`, a folder visible on every machine that serves the model (the same mount on the
    worker VMs and the fallback); a request names one as `model: "<base id>:<folder name>"`. Adding an adapter is
    copying a folder there: no redeploy. Object-store URIs (`s3://`, `gs://`, which Ray Serve LLM downloads) are
    refused: mount the bucket instead. `max_num_adapters_per_replica`: adapters one replica (one engine) holds
    at once; the least recently used one is unloaded beyond it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    dynamic_lora_loading_path: str = Field(min_length=1, description="Local or mounted folder of adapter folders.")
    max_num_adapters_per_replica: int = Field(default=16, ge=1, description="Adapters one replica holds at once "
                                              "(least recently used unloaded beyond it).")

    @field_validator("dynamic_lora_loading_path")
    @classmethod
    def _local_path(cls, v: str) -> str:
        scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", v)
        if scheme:
            raise ValueError(f"{v!r}: {scheme.group(1)}:// paths are not supported yet; adapters are read from a "
                             "local or mounted folder (mount the bucket on every worker VM and the fallback, and "
                             "give its path)")
        return os.path.abspath(os.path.expanduser(os.path.expandvars(v)))


class EngineSpec(ServingKnobs):
    """What to serve and how: read once from a model config file or the LLM_* settings, picklable.

    `engine_kwargs` is a plain dict that only the engine validates (vLLM against its AsyncEngineArgs, the
    transformers engine against the keys it declares); `source` names where the spec came from, for errors.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_id: str = Field(min_length=1)
    model_source: str = Field(min_length=1)
    engine: EngineChoice = "auto"
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    lora_config: LoraConfig | None = None
    source: str = ""


@dataclass(frozen=True)
class GrammarSpec:
    """A grammar an engine enforces on one generation. `ebnf` is xgrammar EBNF; `source` is the JSON it was built
    from (schema or structural tag), kept for logs and error messages."""

    kind: GrammarKind
    ebnf: str
    source: str = ""

    def __repr__(self) -> str:  # the EBNF can be long
        return f"GrammarSpec(kind={self.kind!r}, source={self.source[:80]!r}, ebnf=<{len(self.ebnf)} chars>)"


@dataclass(frozen=True)
class TokenCandidate:
    token_id: int
    token: str  # the token's text; "bytes:\\xNN..." when its bytes are not valid UTF-8 alone (OpenAI's notation)
    token_bytes: bytes
    logprob: float  # may be -inf (a token the grammar forbids); the API clamps it to -9999.0 as vLLM does


@dataclass(frozen=True)
class TokenLogprob:
    """One generated position: the chosen token and the `k` most likely ones (most likely first)."""

    chosen: TokenCandidate
    top: tuple[TokenCandidate, ...] = ()


# Who waits first for a generation slot: queued `interactive` requests are admitted before `batch` ones (the
# API maps OpenAI's `service_tier: "flex"` to batch; the batch service sends its lines so).
Priority = Literal["interactive", "batch"]


@dataclass
class GenerationRequest:
    """Engine-level request: either a raw `prompt` or chat `messages`.

    `grammar`: constrain the output to it (structured output, tool calls); `logprobs`: report each generated
    token's logprob and this many top candidates (None: none); `tools`: the tool definitions the chat template
    renders (OpenAI's `tools` entries as plain dicts); `adapter`: the LoRA adapter to apply (a folder name under
    the model's `lora_config.dynamic_lora_loading_path`; None: the base model), from `model: "<base>:<adapter>"`."""

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    ignore_eos: bool = False
    grammar: GrammarSpec | None = None
    logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    priority: Priority = "interactive"
    adapter: str | None = None


@dataclass
class GenerationChunk:
    """One step of output. `completion_tokens` is cumulative; `text` is the new delta.

    The first chunk of a stream carries `served_by`, set by the server hosting the engine
    (`transformers@standalone`, `vllm@10.0.0.5/abc123` for a Ray replica, `deepspeed@rank0`). With
    `GenerationRequest.logprobs` set, `logprobs` holds one entry per token generated since the previous chunk.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None
    served_by: str | None = None
    logprobs: list[TokenLogprob] | None = None


def merge_chunks(chunks: list[GenerationChunk]) -> GenerationChunk:
    """Consecutive chunks of one stream as one: texts joined, the last one's counts and finish reason, the
    first one's `served_by`. (A field added to GenerationChunk that accumulates must be joined here too.)"""
    if len(chunks) == 1:
        return chunks[0]
    last = chunks[-1]
    return GenerationChunk(
        text="".join(c.text for c in chunks), prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens, finish_reason=last.finish_reason,
        served_by=next((c.served_by for c in chunks if c.served_by), None),
        logprobs=[e for c in chunks for e in c.logprobs or ()] if any(c.logprobs is not None for c in chunks)
        else None,
    )


@dataclass
class EngineInfo:
    """What the API reports about the engine serving a model."""

    model_id: str
    engine: str  # "transformers" | "vllm" | "deepspeed"
    model_source: str
    max_context: int
    device: str = "cpu"
    dtype: str = "float32"
    reason: str = ""  # why this engine was selected (e.g. the vLLM fallback reason)
    max_parallel: int = 0  # generations one request may fan out to (running + waiting slots); 0 = unknown
    tool_call_parser: str = "hermes"  # the model's tool-call format (ServingKnobs.tool_call_parser)
    threads: str = ""  # the compute threads the engine runs with on CPU, and why (vLLM-CPU: its OpenMP threads)
    lora_path: str = ""  # where its LoRA adapters are read (lora_config.dynamic_lora_loading_path); "": none
    max_adapters: int = 0  # adapters one replica holds at once (lora_config.max_num_adapters_per_replica)


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0


# ----------------------------------------------------------------------------- errors


class EngineError(Exception):
    """Base of errors an engine reports to clients. Picklable (message only)."""

    status_code = 500
    error_type = "server_error"
    code: str | None = None
    param: str | None = None

    def __init__(self, message: str, *, param: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        if param is not None:
            self.param = param
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_error, (type(self), self.message, self.param, self.retry_after))


def _rebuild_error(cls: type[EngineError], message: str, param: str | None, retry_after: float | None
                   ) -> EngineError:
    return cls(message, param=param, retry_after=retry_after)


class InvalidRequestError(EngineError):
    status_code = 400
    error_type = "invalid_request_error"


class PromptTooLongError(InvalidRequestError):
    code = "context_length_exceeded"
    param = "messages"


class ModelNotFoundError(EngineError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"
    param = "model"


class MissingPackageError(EngineError):
    """The request needs an optional package this server lacks (the message names it and the install command)."""

    status_code = 501
    error_type = "server_error"
    code = "missing_package"


class QueueFullError(EngineError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "queue_full"


class EngineNotReadyError(EngineError):
    status_code = 503
    error_type = "service_unavailable"
    code = "engine_not_ready"


class EngineDeadError(EngineNotReadyError):
    code = "engine_dead"


class ModelNotServedHereError(EngineNotReadyError):
    """A backup server (nginx's fallback) asked for a model it does not serve: the cluster it stands in for
    may serve it, so this is a retryable 503, not a 404."""

    code = "model_not_served_here"
    param = "model"


# ----------------------------------------------------------------------------- protocol


class Engine(abc.ABC):
    """Contract for inference engines (transformers, vLLM, DeepSpeed TP)."""

    info: EngineInfo

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model and run a warm-up forward pass. Raises on failure."""

    @abc.abstractmethod
    def is_ready(self) -> bool:
        """True once `start` succeeded and the engine has not died."""

    @abc.abstractmethod
    async def check_health(self) -> None:
        """Raise `EngineDeadError` when the engine can no longer serve."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        """Stream output (an async generator). Every error, admission and validation included, is raised
        when the first chunk is asked for. The last chunk carries `finish_reason`. Closing the iterator
        aborts the request."""

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        """Current running/waiting request counts."""

    async def count_prompt_tokens(self, request: GenerationRequest) -> int:  # pragma: no cover - optional
        """Tokens of the request's prompt as this engine renders it (benchmarks report it)."""
        raise NotImplementedError

    def adapter_ids(self) -> list[str]:
        """The LoRA adapters this engine can serve now (the adapter folders found; default: none)."""
        return []

    async def load_adapter(self, name: str) -> None:
        """Check and load adapter `name` (ModelNotFoundError: no such folder; InvalidRequestError: a bad one).
        Engines that serve no adapters refuse it (the default)."""
        raise InvalidRequestError(f"model {self.info.model_id} serves no LoRA adapters", param="model")

    async def unload_adapter(self, name: str) -> None:
        """Let adapter `name` go (it is unloaded once no running request uses it). Default: nothing to do."""
        return None

    async def shutdown(self) -> None:
        """Release resources. Default: nothing to do."""
        return None
