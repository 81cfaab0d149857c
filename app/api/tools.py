"""OpenAI function calling, model-format independent: request models, checks, and what the engine must do.

- Request side: `ToolDefinition` (`tools`), `ToolChoice` (`tool_choice`), `AssistantToolCall` (an assistant
  message's `tool_calls` in the history). Malformed tool schemas fail pydantic validation with the parameter's
  path (`tools.0.function.parameters`); `plan_tools` and `check_tool_messages` raise `InvalidRequestError` naming
  the parameter for what needs the whole request (unknown names in `tool_choice`, `tool` messages that answer no
  call).
- Response side: `ToolCall` (non-streaming `message.tool_calls`) and `DeltaToolCall` (streaming deltas), filled by
  the model format's parser (`app.api.tool_parsers`).
- Engine side: `tools_for_template` / `messages_for_template` give the chat template what HF templates expect
  (tool calls' arguments as objects); `tool_grammar` turns a `ToolPlan` into the `GrammarSpec` that forces
  `required` and named choices (and keeps `auto` calls well-formed).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, Field, field_validator

from app.api.strict import Name, RequestModel, Text
from app.engines.base import InvalidRequestError
from app.engines.grammar.json_schema import check_metaschema
from app.engines.grammar.specs import GrammarSpec, json_schema_grammar, structural_tag_grammar

MAX_TOOLS = 128  # OpenAI's limit
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


# ----------------------------------------------------------------------------- request models


class FunctionDefinition(RequestModel):
    name: Name
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _check_parameters(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        check_metaschema(v)
        if v.get("type", "object") != "object":
            raise ValueError("must be a JSON schema of type object (the arguments are a JSON object)")
        return v

    @property
    def parameters_schema(self) -> dict[str, Any]:
        return self.parameters if self.parameters is not None else EMPTY_PARAMETERS


class ToolDefinition(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: Text


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ToolCallFunction(RequestModel):
    name: Text
    arguments: Text


class AssistantToolCall(RequestModel):
    """One entry of an assistant message's `tool_calls` in the conversation history."""

    id: Text = Field(min_length=1)
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ToolFields(RequestModel):
    """The chat request's tool fields (mixed into `ChatCompletionRequest` at integration)."""

    tools: Annotated[list[ToolDefinition], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True

    def tool_plan(self) -> ToolPlan | None:
        return plan_tools(self.tools, self.tool_choice, self.parallel_tool_calls)


# ----------------------------------------------------------------------------- response models


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall = Field(default_factory=DeltaFunctionCall)


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def finish_reason(engine_reason: str | None, called_tools: bool) -> str | None:
    """OpenAI's finish_reason: `tool_calls` when the model stopped after calling tools; `length` stays `length`."""
    return "tool_calls" if called_tools and engine_reason == "stop" else engine_reason


# ----------------------------------------------------------------------------- request checks


@dataclass(frozen=True)
class ToolPlan:
    """What a request asks of the tool machinery: `mode` none (tools shown to the model, its output is text),
    auto (the model may call), required (it must call one or more), named (it must call `functions[0]`)."""

    mode: Literal["none", "auto", "required", "named"]
    tools: tuple[ToolDefinition, ...]
    allowed: tuple[int, ...]  # indexes into `tools` the model may call
    parallel: bool = True

    @property
    def parses_calls(self) -> bool:
        return self.mode != "none"


def plan_tools(
    tools: Sequence[ToolDefinition] | None, tool_choice: ToolChoice | None, parallel: bool = True
) -> ToolPlan | None:
    """Check `tools` against `tool_choice`; None when the request involves no tools."""
    tools = tuple(tools or ())
    if not tools:
        if tool_choice is None or tool_choice in ("none", "auto"):
            return None
        raise InvalidRequestError("tool_choice requires tools: the request defines none", param="tool_choice")
    seen: dict[str, int] = {}
    for i, tool in enumerate(tools):
        name = tool.function.name
        if name in seen:
            raise InvalidRequestError(f"tools.{i}.function.name: {name!r} is already defined by tools.{seen[name]}",
                                      param=f"tools.{i}.function.name")
        seen[tool.function.name] = i
    if isinstance(tool_choice, NamedToolChoice):
        name = tool_choice.function.name
        if name not in seen:
            raise InvalidRequestError(
                f"tool_choice names function {name!r}, which is not in tools (defined: {', '.join(seen)})",
                param="tool_choice.function.name",
            )
        return ToolPlan("named", tools, (seen[name],), parallel)
    mode = tool_choice or "auto"
    return ToolPlan(mode, tools, tuple(range(len(tools))), parallel)


def check_tool_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    """Every `tool` message must answer a call of the assistant message just before it (other tool messages may
    come between), by `tool_call_id`; assistant tool call ids must be unique. 400 naming the message."""
    open_ids: set[str] = set()
    answering = False  # only tool messages since the last assistant message with tool_calls
    seen: set[str] = set()
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role == "tool":
            call_id = msg.get("tool_call_id")
            if not call_id:
                raise InvalidRequestError(f"messages.{i}.tool_call_id: a tool message needs the id of the call it "
                                          "answers", param=f"messages.{i}.tool_call_id")
            if not answering or call_id not in open_ids:
                raise InvalidRequestError(
                    f"messages.{i}.tool_call_id: {call_id!r} answers no tool call of the preceding assistant message",
                    param=f"messages.{i}.tool_call_id",
                )
            continue
        answering = False
        if role == "assistant" and msg.get("tool_calls"):
            open_ids = set()
            for j, call in enumerate(msg["tool_calls"]):
                call_id = _field(call, "id")
                if call_id in seen:
                    raise InvalidRequestError(f"messages.{i}.tool_calls.{j}.id: {call_id!r} is used twice",
                                              param=f"messages.{i}.tool_calls.{j}.id")
                seen.add(call_id)
                open_ids.add(call_id)
            answering = True


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name)


# ----------------------------------------------------------------------------- engine side


def tools_for_template(tools: Sequence[ToolDefinition]) -> list[dict[str, Any]]:
    """`tools` as chat templates render them (`tool | tojson`)."""
    return [t.model_dump(exclude_none=True) for t in tools]


def messages_for_template(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as HF chat templates expect them: an assistant tool call's `arguments` is an object, not the JSON
    text OpenAI sends (Qwen2.5 renders it with `| tojson`; a string would come out quoted). Arguments that are not
    a JSON object stay text."""
    out = []
    for msg in messages:
        msg = dict(msg)
        if msg.get("tool_calls"):
            calls = []
            for call in msg["tool_calls"]:
                call = call.model_dump() if isinstance(call, BaseModel) else json.loads(json.dumps(call))
                args = call.get("function", {}).get("arguments")
                if isinstance(args, str):
                    try:
                        parsed = json.loads(args)
                    except ValueError:
                        parsed = None
                    if isinstance(parsed, dict):
                        call["function"]["arguments"] = parsed
                calls.append(call)
            msg["tool_calls"] = calls
        out.append(msg)
    return out


class ToolCallSyntax(Protocol):
    """What `tool_grammar` needs of a tool-call format (`app.api.tool_parsers.ToolCallParser` implements it)."""

    def structural_tag(self, functions: Sequence[tuple[str, dict[str, Any]]], *, mode: str,
                       parallel: bool) -> dict[str, Any]:
        """The structural tag for (name, arguments content format) pairs."""


def tool_grammar(plan: ToolPlan, parser: ToolCallSyntax) -> GrammarSpec | None:
    """The grammar of the model's output for `plan`, in the parser's format: named and required force tool calls
    (arguments matching each function's parameters schema); auto allows text, but a started call must be
    well-formed; none is unconstrained. Unsupported schema features are a 400 naming the tool's parameters.

    Arguments are compact JSON (`{"city": "Paris", "n": 2}`: one space after `:` and `,`, no other whitespace),
    the way chat templates render tool calls (`tojson`) and production engines constrain them: free whitespace
    would let a weak model spend its tokens on blanks."""
    if plan.mode == "none":
        return None
    functions = []
    for i in plan.allowed:
        fn = plan.tools[i].function
        args = json_schema_grammar(fn.parameters_schema, param=f"tools.{i}.function.parameters", any_whitespace=False)
        functions.append((fn.name, {"type": "grammar", "grammar": args.ebnf}))
    tag = parser.structural_tag(functions, mode=plan.mode, parallel=plan.parallel)
    return structural_tag_grammar(tag, param="tools")
