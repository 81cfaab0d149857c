"""The hermes tool-call parser (Qwen2.5/Qwen3 `<tool_call>` JSON): complete parse, streaming deltas, registry."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from app.api.tool_parsers import HermesToolParser, ParsedDelta, ToolCallParser, get_parser, parser_names
from app.api.tools import finish_reason

pytestmark = pytest.mark.unit

CALL_1 = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris \\"}{[", "days": [1, {"a": 2}]}}\n'
          "</tool_call>")
CALL_2 = '<tool_call>\n{"name": "search", "arguments": {"q": "ünï ✓"}}\n</tool_call>'


def parser() -> ToolCallParser:
    ids = (f"call_{i}" for i in itertools.count())
    return get_parser("hermes", id_factory=lambda: next(ids))


def stream_all(text: str, sizes: list[int]) -> ParsedDelta:
    """Feed `text` in chunks of the given sizes (cycled) and merge every delta."""
    stream = parser().stream()
    merged = ParsedDelta()
    pos = 0
    for size in itertools.cycle(sizes):
        if pos >= len(text):
            break
        merged.extend(stream.feed(text[pos : pos + size]))
        pos += size
    merged.extend(stream.finish())
    return merged


def test_registry_names_hermes_and_rejects_unknown_names() -> None:
    assert "hermes" in parser_names()
    assert isinstance(get_parser("hermes"), HermesToolParser)
    with pytest.raises(ValueError, match=r"unknown tool_call_parser 'nope': known parsers are .*hermes"):
        get_parser("nope")
    with pytest.raises(ValueError, match="registered twice"):
        type("Again", (HermesToolParser,), {"name": "hermes"})


def test_content_then_two_calls() -> None:
    msg = parser().parse("Let me check.\n" + CALL_1 + "\n" + CALL_2)
    assert msg.content == "Let me check."
    assert [c.function.name for c in msg.tool_calls] == ["get_weather", "search"]
    assert [c.id for c in msg.tool_calls] == ["call_0", "call_1"]
    assert json.loads(msg.tool_calls[0].function.arguments) == {"city": 'Paris "}{[', "days": [1, {"a": 2}]}
    # arguments are the model's own JSON text, not re-serialized
    assert msg.tool_calls[1].function.arguments == '{"q": "ünï ✓"}'


def test_only_calls_gives_null_content_and_tool_calls_finish() -> None:
    msg = parser().parse(CALL_2)
    assert msg.content is None and len(msg.tool_calls) == 1
    assert finish_reason("stop", bool(msg.tool_calls)) == "tool_calls"
    assert finish_reason("length", True) == "length"
    assert finish_reason("stop", False) == "stop"


def test_plain_text_is_kept_exactly() -> None:
    text = "Hello <b> world, a < b and <tool not a tag\n\n"
    msg = parser().parse(text)
    assert msg.content == text and msg.tool_calls == []


def test_a_block_that_is_not_a_call_stays_content() -> None:
    text = "see <tool_call>not json</tool_call> end"
    assert parser().parse(text).content == text
    assert parser().parse("x <tool_call>{\"name\": 1}</tool_call>").content == 'x <tool_call>{"name": 1}</tool_call>'


def test_other_key_orders_and_string_arguments_are_calls_sent_whole() -> None:
    msg = parser().parse('<tool_call>\n{"arguments": {"q": 1}, "name": "search"}\n</tool_call>')
    assert msg.tool_calls[0].function.name == "search"
    assert json.loads(msg.tool_calls[0].function.arguments) == {"q": 1}
    msg = parser().parse('<tool_call>\n{"name": "search", "arguments": "{\\"q\\": 2}"}\n</tool_call>')
    assert msg.tool_calls[0].function.arguments == '{"q": 2}'


def test_a_call_cut_off_by_max_tokens_keeps_its_partial_arguments() -> None:
    msg = parser().parse('<tool_call>\n{"name": "f", "arguments": {"a": "trunc')
    assert msg.tool_calls[0].function.name == "f"
    assert msg.tool_calls[0].function.arguments == '{"a": "trunc'


@pytest.mark.parametrize("sizes", [[1], [2], [3, 1, 7], [11], [1000]])
def test_streaming_in_any_chunking_equals_the_complete_parse(sizes: list[int]) -> None:
    text = "Let me check.\n" + CALL_1 + "\n" + CALL_2 + "\n"
    whole = parser().parse(text)
    merged = stream_all(text, sizes)
    assert merged.content == whole.content
    assert [(d.index, d.id, d.function.name, d.function.arguments) for d in merged.tool_calls] == [
        (i, c.id, c.function.name, c.function.arguments) for i, c in enumerate(whole.tool_calls)
    ]


def test_random_chunkings_agree() -> None:
    rng = random.Random(7)
    text = "Sure" + " \n" + CALL_2 + "\n" + CALL_1 + "\nDone."
    whole = parser().parse(text)
    for _ in range(50):
        merged = stream_all(text, [rng.randint(1, 9) for _ in range(5)])
        assert merged.content == whole.content == "SureDone."
        assert [d.function.arguments for d in merged.tool_calls] == [c.function.arguments for c in whole.tool_calls]


def test_stream_deltas_have_openai_shape() -> None:
    stream = parser().stream()
    first = stream.feed('<tool_call>\n{"name": "get_weather", "arguments": ')
    assert [d.model_dump(exclude_none=True) for d in first.tool_calls] == [
        {"index": 0, "id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    ]
    assert stream.called_tools
    more = stream.feed('{"city": "Pa')
    assert [d.model_dump(exclude_none=True) for d in more.tool_calls] == [
        {"index": 0, "function": {"arguments": '{"city": "Pa'}}
    ]
    rest = stream.feed('ris"}}\n</tool_call>')
    assert [d.function.arguments for d in rest.tool_calls] == ['ris"}']
    assert not stream.finish()


def test_text_is_held_back_only_while_it_may_start_a_tag() -> None:
    stream = parser().stream()
    assert stream.feed("Hello <tool").content == "Hello"
    assert stream.feed("box>").content == " <toolbox>"
    assert not stream.called_tools


def test_structural_tags_per_mode() -> None:
    fns = [("a", {"type": "json_schema", "json_schema": {"type": "object"}}),
           ("b", {"type": "grammar", "grammar": 'root ::= "{}"'})]
    p = HermesToolParser()
    named = p.structural_tag(fns[:1], mode="named", parallel=True)["format"]
    assert named == {"type": "tag", "begin": '<tool_call>\n{"name": "a", "arguments": ',
                     "content": {"type": "json_schema", "json_schema": {"type": "object"}}, "end": "}\n</tool_call>"}
    required = p.structural_tag(fns, mode="required", parallel=False)["format"]
    assert required["type"] == "tags_with_separator" and required["at_least_one"] and required["stop_after_first"]
    auto = p.structural_tag(fns, mode="auto", parallel=True)["format"]
    assert auto["type"] == "triggered_tags" and auto["triggers"] == ["<tool_call>"] and not auto["at_least_one"]
    with pytest.raises(ValueError):
        p.structural_tag(fns, mode="none", parallel=True)
