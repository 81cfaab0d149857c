"""Pydantic models of the OpenAI wire format (requests, responses, stream chunks, errors).

Only data shapes live here; the logic that fills them is in `app.api.openai`. The request fields of tools
(`app.api.tools`), response_format (`app.api.response_format`) and logprobs (`app.api.logprobs`) are mixed in from
their own modules.
Unknown request fields are ignored (as OpenAI-compatible servers do), but fields
whose semantics we do not implement are rejected with a 400 naming the field.
Types are strict (no "5" for an integer, no 1 for a boolean), as OpenAI's API is.
Every string field is `Text` (`app.api.strict`, with `Int`): a lone surrogate (`"\\udc00"` is valid JSON but
not Unicode) is a 400 naming the field (error type `invalid_unicode`), never a crash in a tokenizer.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from app.api.logprobs import ChatChoiceLogprobs, ChatLogprobsFields, CompletionLogprobs, CompletionLogprobsFields
from app.api.response_format import ResponseFormatFields
from app.api.strict import INTEGRAL, Int, Int64, RequestModel, Text
from app.api.tools import AssistantToolCall, DeltaToolCall, ToolCall, ToolFields

MAX_STOP_SEQUENCES = 8
# cross-field rules in the OpenAPI document (as the validators enforce them)
STREAM_OPTIONS_RULE: list[JsonValue] = [{"properties": {"stream": {"const": True}}, "required": ["stream"]},
                       {"properties": {"stream_options": {"type": "null"}}}]
TOP_LOGPROBS_RULE: list[JsonValue] = [{"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]},
                     {"properties": {"top_logprobs": {"type": "null"}}}]


_Request = RequestModel  # strict: OpenAI rejects "5" for an integer and "yes" for a boolean


class StreamOptions(_Request):
    include_usage: bool = False


class TextContentPart(_Request):
    type: Literal["text"]
    text: Text


def _json_type(v: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", dict: "an object",
             list: "an array"}
    return names.get(type(v), "null" if v is None else "a " + type(v).__name__)


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[TextContentPart] | None = None
    name: Text | None = None
    tool_calls: list[AssistantToolCall] | None = None  # assistant messages: the calls it made
    tool_call_id: Text | None = None  # tool messages: the call they answer

    @field_validator("content", mode="before")
    @classmethod
    def _content_shape(cls, v: Any) -> Any:
        """OpenAI's words for a content of the wrong shape (pydantic's union errors name every branch)."""
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise ValueError(f"Invalid type: expected a string or an array of content parts, got {_json_type(v)}")
        for i, part in enumerate(v):
            if not isinstance(part, dict):
                raise ValueError(f"Invalid content part {i}: expected an object, got {_json_type(part)}")
            kind = part.get("type")
            if kind != "text":
                shown = f"{kind!r}" if isinstance(kind, str) else "missing" if kind is None else _json_type(kind)
                raise ValueError(f"Invalid content part {i} type: {shown}. Supported values are: 'text' "
                                 "(this server serves text-only models)")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"Invalid content part {i}: a 'text' part needs a string 'text'")
        return v

    def for_template(self) -> dict[str, Any]:
        """The message as the engine's chat template gets it (before `messages_for_template`)."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


def _normalise_stop(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else list(value)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
    if any(s == "" for s in stops):
        raise ValueError("stop sequences must not be empty")
    return stops


class _SamplingFields(_Request):
    """Fields shared by chat and text completions.

    `json_schema_extra` makes the OpenAPI document as strict as the validators below (fields accepted only
    at their neutral values, stream_options only with stream), so schema-valid requests are accepted.
    """

    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra={"anyOf": STREAM_OPTIONS_RULE})

    model: Text = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=16), INTEGRAL] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = Field(None, json_schema_extra={
        "minLength": 1, "maxItems": MAX_STOP_SEQUENCES, "items": {"type": "string", "minLength": 1}})
    # the signed 64-bit range, as vLLM accepts it (engines fold a seed to 64 bits: app.engines.hf.runner, vllm)
    seed: Int64 | None = None
    user: Text | None = None
    # flex: batch priority (queued interactive requests are admitted first); the batch service sends flex
    service_tier: Literal["auto", "default", "flex", "priority"] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    # vLLM-compatible extensions
    min_tokens: Annotated[int, Field(ge=0), INTEGRAL] = 0
    ignore_eos: bool = False
    # accepted only at their neutral values
    logit_bias: dict[str, float] | None = Field(None, json_schema_extra={"maxProperties": 0})

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        _normalise_stop(v)
        return v

    @model_validator(mode="after")
    def _check_unsupported(self) -> _SamplingFields:
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def stop_list(self) -> list[str]:
        return _normalise_stop(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields, ToolFields, ResponseFormatFields, ChatLogprobsFields):
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra={"allOf": [
        {"anyOf": STREAM_OPTIONS_RULE}, {"anyOf": TOP_LOGPROBS_RULE}]})

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingFields, CompletionLogprobsFields):
    prompt: Text | list[Text] = Field(..., json_schema_extra={
        "minLength": 1, "minItems": 1, "maxItems": 16, "items": {"type": "string", "minLength": 1}})
    echo: bool = Field(False, json_schema_extra={"enum": [False]})
    suffix: Text | None = Field(None, json_schema_extra={"maxLength": 0})
    best_of: Int | None = Field(None, json_schema_extra={"enum": [None, 1]})

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        if v == "" or (isinstance(v, list) and "" in v):
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 prompts per request")
        return v

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported by this server")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        if self.best_of not in (None, 1):
            raise ValueError("best_of is not supported by this server")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


# ----------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None when the model only called tools
    tool_calls: list[ToolCall] | None = None  # left out of the JSON when the model called none (as OpenAI does)

    @model_serializer(mode="wrap")
    def _without_empty_tool_calls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    finish_reason: str | None
    logprobs: ChatChoiceLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "llm-serving-kit"
    engine: str
    engine_reason: str = ""
    max_model_len: int | None = None
    ready: bool = False
    root: str | None = Field(default=None, description="A LoRA adapter's base model id (vLLM's field).")
    parent: str | None = Field(default=None, description="A LoRA adapter's base model id (`<parent>:<adapter>`).")
    engine_info: dict[str, Any] = Field(default_factory=dict, description="Every EngineInfo field, as the engine "
                                        "reports it (max_parallel: generations one request may fan out to).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
