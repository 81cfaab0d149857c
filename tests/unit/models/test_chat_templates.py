"""The Qwen-family chat template renders tools, tool calls and tool responses as Qwen2.5/Qwen3 do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from app.api.tool_parsers import get_parser
from app.api.tools import messages_for_template
from app.models.chat_templates import QWEN_TOOLS_TEMPLATE

pytestmark = pytest.mark.unit

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model)


def render(tok: Any, messages: list[dict], **kw: Any) -> str:
    return tok.apply_chat_template(messages, chat_template=QWEN_TOOLS_TEMPLATE, tokenize=False, **kw)


def test_tools_go_into_the_system_message(tokenizer: Any) -> None:
    text = render(tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Oslo?"}],
                  tools=[WEATHER], add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user "
        "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", '
        '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}\n'
        "</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nOslo?<|im_end|>\n<|im_start|>assistant\n"
    )
    no_system = render(tokenizer, [{"role": "user", "content": "Oslo?"}], tools=[WEATHER])
    assert no_system.startswith("<|im_start|>system\n# Tools\n\n")


def test_tool_calls_and_responses(tokenizer: Any) -> None:
    messages = [
        {"role": "user", "content": "Oslo and Rome?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [CALL, {**CALL, "id": "call_2", "function": {
            "name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
    ]
    text = render(tokenizer, messages_for_template(messages), tools=[WEATHER], add_generation_prompt=True)
    assert text.split("<|im_end|>\n", 1)[1] == (
        "<|im_start|>user\nOslo and Rome?<|im_end|>\n"
        "<|im_start|>assistant\nChecking.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    # arguments sent as text (no messages_for_template) render the same; content None is allowed
    raw = render(tokenizer, [{"role": "assistant", "content": None, "tool_calls": [CALL]}])
    assert raw == '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n' \
                  "</tool_call><|im_end|>\n"


def test_what_the_template_renders_the_parser_reads_back(tokenizer: Any) -> None:
    text = render(tokenizer, messages_for_template([{"role": "assistant", "content": None, "tool_calls": [CALL]}]))
    body = text.removeprefix("<|im_start|>assistant\n").removesuffix("<|im_end|>\n")
    msg = get_parser("hermes").parse(body)
    assert msg.content is None
    assert [(c.function.name, c.function.arguments) for c in msg.tool_calls] == [("get_weather", '{"city": "Oslo"}')]


# the tiny model's template before tools (every chat prompt the suites built until then)
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_without_tools_it_renders_what_the_tiny_template_did(tokenizer: Any) -> None:
    for messages in (
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
         {"role": "developer", "content": "d"}, {"role": "system", "content": "late"}],
    ):
        for gen in (True, False):
            old = tokenizer.apply_chat_template(messages, chat_template=PLAIN_TEMPLATE, tokenize=False,
                                                add_generation_prompt=gen)
            assert render(tokenizer, messages, add_generation_prompt=gen) == old
