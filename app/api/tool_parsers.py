"""Tool-call output formats: model text in, OpenAI `tool_calls` out, registered by name (`tool_call_parser`).

A parser knows one model family's tool-call syntax both ways: `structural_tag` describes it to the grammar
(so constrained decoding forces or shapes calls), and `stream()` reads it back. The stream turns text deltas
into `ParsedDelta`s (plain content plus `DeltaToolCall`s: id, index, name, argument fragments); the complete
parse is that same stream run over the whole text, so streaming and non-streaming answers agree by construction.

Parsers register by name when subclassed (`name = "hermes"`), as vLLM names them; `get_parser(name)` builds one
and a config naming an unknown parser fails with the known names.

`hermes` (Qwen2.5, Qwen3, Hermes 2 Pro): `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`. Argument
fragments are the model's own JSON text, streamed as it arrives (no re-serialization), so the fragments of a call
concatenate to exactly the non-streaming `arguments`. Calls not written name-first, or with arguments as a JSON
string, are sent whole once their closing tag arrives; a `<tool_call>` block that is not a call stays content.
"""

from __future__ import annotations

import abc
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from app.api.tools import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall, new_tool_call_id

_REGISTRY: dict[str, type[ToolCallParser]] = {}


@dataclass
class ParsedDelta:
    """What one text delta adds to the answer: content text and tool-call deltas (at most one per call index)."""

    content: str = ""
    tool_calls: list[DeltaToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)

    def extend(self, other: ParsedDelta) -> None:
        self.content += other.content
        for delta in other.tool_calls:
            self.add(delta)

    def add(self, delta: DeltaToolCall) -> None:
        """Merge `delta` into this one's delta for the same call, if any."""
        for mine in self.tool_calls:
            if mine.index == delta.index:
                mine.id = mine.id or delta.id
                mine.type = mine.type or delta.type
                mine.function.name = mine.function.name or delta.function.name
                if delta.function.arguments is not None:
                    mine.function.arguments = (mine.function.arguments or "") + delta.function.arguments
                return
        self.tool_calls.append(delta.model_copy(deep=True))


@dataclass
class ParsedMessage:
    content: str | None
    tool_calls: list[ToolCall]


class ToolCallStream(abc.ABC):
    """Incremental parser state for one choice."""

    @abc.abstractmethod
    def feed(self, text: str) -> ParsedDelta:
        """Take the next text delta; return what can be sent now."""

    @abc.abstractmethod
    def finish(self) -> ParsedDelta:
        """End of generation: whatever was held back."""

    @property
    @abc.abstractmethod
    def called_tools(self) -> bool:
        """True once a tool call was emitted (the finish_reason becomes `tool_calls`)."""


class ToolCallParser(abc.ABC):
    """A model family's tool-call syntax. Subclasses set `name`, which registers them."""

    name: ClassVar[str]

    def __init__(self, id_factory: Callable[[], str] = new_tool_call_id):
        self.id_factory = id_factory

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in _REGISTRY:
                raise ValueError(f"tool call parser {cls.name!r} is registered twice")
            _REGISTRY[cls.name] = cls

    @abc.abstractmethod
    def stream(self) -> ToolCallStream:
        """A fresh incremental parser for one choice."""

    @abc.abstractmethod
    def structural_tag(self, functions: Sequence[tuple[str, dict[str, Any]]], *, mode: str,
                       parallel: bool) -> dict[str, Any]:
        """xgrammar structural tag (as JSON data) of this format's output for `mode` auto, required or named
        (`functions` then holds the one function); `functions` are (name, arguments format) pairs, the format an
        xgrammar structural-tag content format for the arguments object (`tool_grammar` passes compact JSON
        following the function's parameters schema)."""

    def parse(self, text: str) -> ParsedMessage:
        """The complete answer: the stream over the whole text, merged. Content is None when it is empty and
        tools were called (as OpenAI sends it)."""
        stream = self.stream()
        merged = stream.feed(text)
        merged.extend(stream.finish())
        calls = [
            ToolCall(id=d.id or self.id_factory(),
                     function=FunctionCall(name=d.function.name or "", arguments=d.function.arguments or ""))
            for d in sorted(merged.tool_calls, key=lambda d: d.index)
        ]
        content = merged.content if (merged.content or not calls) else None
        return ParsedMessage(content, calls)


def parser_names() -> list[str]:
    return sorted(_REGISTRY)


def check_parser_name(name: str) -> str:
    """A config's `tool_call_parser` (pydantic validator): ValueError naming the known parsers when unknown."""
    if name not in _REGISTRY:
        get_parser(name)
    return name


def get_parser(name: str, **kwargs: Any) -> ToolCallParser:
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown tool_call_parser {name!r}: known parsers are {', '.join(parser_names())}") from None
    return cls(**kwargs)


# ----------------------------------------------------------------------------- hermes


def _held_prefix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (it may become the tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


_JSON_STR = r'"((?:[^"\\]|\\.)*)"'
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*' + _JSON_STR + r'\s*,\s*"arguments"\s*:\s*', re.S)
_FIRST_KEY = re.compile(r'\s*\{\s*' + _JSON_STR, re.S)
_NAME_THEN = re.compile(r'\s*\{\s*"name"\s*:\s*' + _JSON_STR + r'\s*([,}])\s*(?:' + _JSON_STR + r')?', re.S)


class _JsonValueScanner:
    """Finds where a JSON value ends in streamed text (strings, escapes and nesting tracked)."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.started = False
        self.kind = ""  # "container", "string" or "scalar"

    def scan(self, text: str) -> int | None:
        """Index just past the value's end in `text`, or None when it continues past `text`."""
        for i, ch in enumerate(text):
            if not self.started:
                self.started = True
                self.kind = "container" if ch in "{[" else "string" if ch == '"' else "scalar"
                if self.kind == "string":
                    self.in_string = True
                    continue
                if self.kind == "scalar":
                    continue
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
                    if self.kind == "string":
                        return i + 1
                continue
            if self.kind == "scalar":
                if ch in ",}] \t\r\n":
                    return i
                continue
            if ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return None


class _HermesStream(ToolCallStream):
    START, END = "<tool_call>", "</tool_call>"

    def __init__(self, id_factory: Callable[[], str]):
        self._id_factory = id_factory
        self._buf = ""
        self._state = "text"  # text | head | args | tail | whole
        self._index = -1
        self._scanner = _JsonValueScanner()
        self._args_text = ""  # an arguments value written as a JSON string, sent decoded once complete
        self._segment_started = False  # text after a call: its leading whitespace is dropped
        self._space_before = ""  # whitespace held back before a block, restored if the block is not a call

    @property
    def called_tools(self) -> bool:
        return self._index >= 0

    def feed(self, text: str) -> ParsedDelta:
        self._buf += text
        out = ParsedDelta()
        while getattr(self, f"_{self._state}")(out, False):
            pass
        return out

    def finish(self) -> ParsedDelta:
        out = ParsedDelta()
        while getattr(self, f"_{self._state}")(out, True):
            pass
        return out

    # State handlers consume what they can; True means the state changed and the next handler should run.
    def _text(self, out: ParsedDelta, final: bool) -> bool:
        at = self._buf.find(self.START)
        if at >= 0:
            before = self._buf[:at]
            self._send_text(out, before.rstrip())  # whitespace before a call is not content
            self._space_before = before[len(before.rstrip()):]
            self._buf = self._buf[at + len(self.START):]
            self._state = "head"
            return True
        if final:
            # an answer without calls keeps its text exactly; after calls only real text counts
            self._send_text(out, self._buf if not self.called_tools else self._buf.rstrip())
            self._buf = ""
            return False
        sendable = self._buf[: len(self._buf) - _held_prefix(self._buf, self.START)]
        body = sendable.rstrip()  # trailing whitespace waits: it is dropped if a call follows
        self._send_text(out, body)
        self._buf = self._buf[len(body):]
        return False

    def _send_text(self, out: ParsedDelta, text: str) -> None:
        if self.called_tools and not self._segment_started:
            text = text.lstrip()
        if text:
            out.content += text
            self._segment_started = True

    def _after_call(self, rest: str) -> None:
        self._buf = rest
        self._state = "text"
        self._segment_started = False

    def _head(self, out: ParsedDelta, final: bool) -> bool:
        head = _HEAD.match(self._buf)
        name = None
        if head:
            try:
                name = json.loads(f'"{head.group(1)}"')
            except ValueError:
                name = None
        if head and isinstance(name, str):
            self._index += 1
            out.add(DeltaToolCall(index=self._index, id=self._id_factory(), type="function",
                                  function=DeltaFunctionCall(name=name, arguments="")))
            self._buf = self._buf[head.end():]
            self._scanner = _JsonValueScanner()
            self._args_text = ""
            self._state = "args"
            return True
        if final or self.END in self._buf or not self._could_be_head():
            self._state = "whole"
            return True
        return False

    def _could_be_head(self) -> bool:
        """False once the block can no longer start with `{"name": "...", "arguments": `."""
        stripped = self._buf.lstrip()
        if stripped and not stripped.startswith("{"):
            return False
        key = _FIRST_KEY.match(self._buf)
        if key and key.group(1) != "name":
            return False
        then = _NAME_THEN.match(self._buf)
        return not (then and (then.group(2) == "}" or (then.group(3) is not None and then.group(3) != "arguments")))

    def _args(self, out: ParsedDelta, final: bool) -> bool:
        text = self._buf if self._scanner.started else self._buf.lstrip()
        end = self._scanner.scan(text)
        piece = text if end is None else text[:end]
        if self._scanner.kind == "string":
            self._args_text += piece
            if end is not None:
                try:
                    value = json.loads(self._args_text)
                except ValueError:
                    value = None
                self._emit_args(out, value if isinstance(value, str) else self._args_text)
        elif piece:
            self._emit_args(out, piece)
        if end is None:  # the value goes on (or was cut off at the end: the call stays, truncated)
            self._buf = ""
            return False
        self._buf = text[end:]
        self._state = "tail"
        return True

    def _emit_args(self, out: ParsedDelta, fragment: str) -> None:
        out.add(DeltaToolCall(index=self._index, function=DeltaFunctionCall(arguments=fragment)))

    def _tail(self, out: ParsedDelta, final: bool) -> bool:
        at = self._buf.find(self.END)
        if at < 0:
            if final:
                self._buf = ""
            return False
        self._after_call(self._buf[at + len(self.END):])
        return True

    def _whole(self, out: ParsedDelta, final: bool) -> bool:
        at = self._buf.find(self.END)
        if at >= 0:
            self._whole_block(out, self._buf[:at], closed=True)
            self._after_call(self._buf[at + len(self.END):])
            return True
        if final:
            self._whole_block(out, self._buf, closed=False)
            self._buf = ""
        return False

    def _whole_block(self, out: ParsedDelta, inner: str, *, closed: bool) -> None:
        """A block that did not stream: one call if it is one, else it stays content."""
        try:
            obj = json.loads(inner)
        except ValueError:
            obj = None
        args = obj.get("arguments", obj.get("parameters")) if isinstance(obj, dict) else None
        if isinstance(obj, dict) and isinstance(obj.get("name"), str) and args is not None:
            self._index += 1
            text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
            out.add(DeltaToolCall(index=self._index, id=self._id_factory(), type="function",
                                  function=DeltaFunctionCall(name=obj["name"], arguments=text)))
        else:
            self._send_text(out, self._space_before + self.START + inner + (self.END if closed else ""))


class HermesToolParser(ToolCallParser):
    """Qwen2.5 / Qwen3 / Hermes: JSON objects inside `<tool_call>` tags, one per call."""

    name = "hermes"
    BEGIN = '<tool_call>\n{"name": "'
    ARGS = '", "arguments": '
    END = "}\n</tool_call>"

    def stream(self) -> ToolCallStream:
        return _HermesStream(self.id_factory)

    def structural_tag(self, functions: Sequence[tuple[str, dict[str, Any]]], *, mode: str,
                       parallel: bool) -> dict[str, Any]:
        tags = [{"type": "tag", "begin": f"{self.BEGIN}{name}{self.ARGS}",
                 "content": content, "end": self.END}
                for name, content in functions]
        if mode == "named":
            fmt: dict[str, Any] = tags[0]
        elif mode == "required":
            fmt = {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True,
                   "stop_after_first": not parallel}
        elif mode == "auto":
            fmt = {"type": "triggered_tags", "triggers": ["<tool_call>"], "tags": tags, "at_least_one": False,
                   "stop_after_first": not parallel}
        else:
            raise ValueError(f"no tool-call grammar for mode {mode!r}")
        return {"type": "structural_tag", "format": fmt}
