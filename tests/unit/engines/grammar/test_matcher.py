"""Constrained decoding and logprobs on the real tiny random-weight model, in process.

A small test-only decode loop (transformers forward calls with a KV cache, greedy or seeded sampling) applies a
`SequenceMatcher` to each step's logits row, the way the engines' decode steps will. Random weights know nothing
about JSON, so valid output here is the grammar's doing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from app.api.tool_parsers import ParsedDelta, get_parser
from app.api.tools import ToolDefinition, finish_reason, plan_tools, tool_grammar, tools_for_template
from app.engines.grammar.matcher import GrammarCompiler, GrammarViolation, SequenceMatcher
from app.engines.grammar.specs import GrammarSpec, json_object_grammar, json_schema_grammar
from app.engines.text import ChunkAssembler
from app.engines.token_logprobs import TokenLogprob, TokenTexts, batch_top_logprobs, top_logprobs
from app.models.chat_templates import QWEN_TOOLS_TEMPLATE

pytestmark = pytest.mark.unit

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", None]},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["zip"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address", "active"],
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"]}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {"q": {"type": "string", "maxLength": 8}, "n": {"type": "integer", "minimum": 1,
                                                                                      "maximum": 9}},
    "required": ["q", "n"]}}}


@dataclass
class Lm:
    model: Any
    tok: Any
    compiler: GrammarCompiler
    texts: TokenTexts

    @property
    def vocab(self) -> int:
        return int(self.model.config.vocab_size)


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    masked_logits: list[torch.Tensor] = field(default_factory=list)
    terminated: bool = False


@pytest.fixture(scope="module")
def lm(tiny_model: Path) -> Iterator[Lm]:
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.eval()
    compiler = GrammarCompiler.for_tokenizer(tok, int(model.config.vocab_size))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model: more threads only contend on a busy machine
    yield Lm(model, tok, compiler, TokenTexts(compiler.vocab_bytes()))
    torch.set_num_threads(threads)


def chat_ids(lm: Lm, content: str, tools: list[dict] | None = None) -> list[int]:
    text = lm.tok.apply_chat_template([{"role": "user", "content": content}], tools=tools, tokenize=False,
                                      add_generation_prompt=True, chat_template=QWEN_TOOLS_TEMPLATE)
    return lm.tok(text, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def decode(lm: Lm, prompt: list[int], spec: GrammarSpec | None, *, seed: int = 0, temperature: float = 0.8,
           max_new: int = 200, logprobs_k: int | None = None, forced: list[int] | None = None) -> Generation:
    """Test-only decode loop: one forward per token; the matcher masks the row before sampling; `forced`
    tokens are taken instead of sampled (still through the mask and the matcher)."""
    matcher = lm.compiler.matcher(spec) if spec else None
    gen = torch.Generator().manual_seed(seed)
    eos = set(lm.compiler.stop_token_ids)
    cache, inp, out = DynamicCache(), torch.tensor([prompt]), Generation()
    forced = list(forced or [])
    for _ in range(max_new):
        step = lm.model(input_ids=inp, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = step.past_key_values
        row = step.logits[0, -1, : lm.vocab].float().clone()
        if matcher:
            matcher.mask_logits(row)
        out.masked_logits.append(row.clone())
        if forced:
            token = forced.pop(0)
        elif temperature == 0:
            token = int(torch.argmax(row))
        else:
            token = int(torch.multinomial(torch.softmax(row / temperature, dim=-1), 1, generator=gen))
        if logprobs_k is not None:
            out.logprobs.append(lm.texts.entry(*top_logprobs(row, token, logprobs_k), logprobs_k))
        out.tokens.append(token)
        if matcher:
            matcher.accept(token)
            if matcher.is_terminated():
                out.terminated = True
                break
        elif token in eos:
            out.terminated = True
            break
        inp = torch.tensor([[token]])
    return out


def text_of(lm: Lm, g: Generation) -> str:
    return lm.tok.decode(g.tokens, skip_special_tokens=True)


def test_json_schema_output_is_valid_json_matching_the_schema_on_many_seeds(lm: Lm) -> None:
    spec = json_schema_grammar(PERSON, param="response_format.json_schema.schema")
    prompt = chat_ids(lm, "Describe a person as JSON.")
    done = 0
    for seed in range(16):
        g = decode(lm, prompt, spec, seed=seed, max_new=300)
        if not g.terminated:
            continue
        done += 1
        value = json.loads(text_of(lm, g))  # strict: no raw control characters in strings
        jsonschema.validate(value, PERSON)
    assert done >= 12, f"only {done} of 16 generations finished within 300 tokens"


def test_json_object_output_is_a_json_object(lm: Lm) -> None:
    spec = json_object_grammar()
    prompt = chat_ids(lm, "Any JSON object.")
    done = 0
    for seed in range(8):
        g = decode(lm, prompt, spec, seed=seed, temperature=0.5, max_new=200)
        if g.terminated:
            done += 1
            assert isinstance(json.loads(text_of(lm, g)), dict)
    assert done >= 4, f"only {done} of 8 generations finished within 200 tokens"


def tool_defs() -> list[ToolDefinition]:
    return [ToolDefinition.model_validate(t) for t in (WEATHER, SEARCH)]


def test_a_named_tool_choice_forces_a_call_that_parses_into_tool_calls(lm: Lm) -> None:
    named = {"type": "function", "function": {"name": "search"}}
    from app.api.tools import NamedToolChoice

    plan = plan_tools(tool_defs(), NamedToolChoice.model_validate(named))
    parser = get_parser("hermes")
    spec = tool_grammar(plan, parser)  # type: ignore[arg-type]
    assert spec is not None
    prompt = chat_ids(lm, "Find cats.", tools_for_template(tool_defs()))
    for seed in range(4):
        g = decode(lm, prompt, spec, seed=seed)
        assert g.terminated
        msg = parser.parse(text_of(lm, g))
        assert msg.content is None and len(msg.tool_calls) == 1
        call = msg.tool_calls[0]
        assert call.function.name == "search" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SEARCH["function"]["parameters"])
        assert finish_reason("stop", True) == "tool_calls"


@pytest.mark.parametrize("parallel", [False, True])
def test_required_calls_stream_as_deltas_equal_to_the_complete_parse(lm: Lm, parallel: bool) -> None:
    plan = plan_tools(tool_defs(), "required", parallel)
    parser = get_parser("hermes")
    spec = tool_grammar(plan, parser)  # type: ignore[arg-type]
    assert spec is not None
    prompt = chat_ids(lm, "Weather or search?", tools_for_template(tool_defs()))
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, SEARCH)}
    for seed in range(4):
        g = decode(lm, prompt, spec, seed=seed, max_new=300)
        whole = parser.parse(text_of(lm, g))
        assert whole.content is None and whole.tool_calls
        if not parallel:  # one call, then only EOS is allowed
            assert g.terminated and len(whole.tool_calls) == 1
        complete = whole.tool_calls if g.terminated else whole.tool_calls[:-1]  # max_tokens may cut the last
        for call in complete:
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        # the stream the API would send: engine text deltas (held back at UTF-8 boundaries) through the parser
        chunks = ChunkAssembler(lm.tok, [], len(prompt))
        stream, merged = parser.stream(), ParsedDelta()
        for i, token in enumerate(g.tokens):
            chunk = chunks.push(token, "stop" if i == len(g.tokens) - 1 else None)
            if chunk is not None:
                merged.extend(stream.feed(chunk.text))
        merged.extend(stream.finish())
        assert stream.called_tools and merged.content == ""
        assert [(d.function.name, d.function.arguments) for d in merged.tool_calls] == [
            (c.function.name, c.function.arguments) for c in whole.tool_calls]


def test_auto_lets_the_model_write_text_but_a_started_call_is_well_formed(lm: Lm) -> None:
    parser = get_parser("hermes")
    prompt = chat_ids(lm, "Hello", tools_for_template(tool_defs()))
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, SEARCH)}
    serial = tool_grammar(plan_tools(tool_defs(), "auto", parallel=False), parser)  # type: ignore[arg-type]
    parallel = tool_grammar(plan_tools(tool_defs(), "auto", parallel=True), parser)  # type: ignore[arg-type]
    assert serial is not None and parallel is not None
    plain = decode(lm, prompt, serial, seed=1, max_new=20)
    assert len(plain.tokens) > 1 and "<tool_call>" not in text_of(lm, plain)  # free text is allowed
    # the model starts a call itself (forced here: random weights rarely would); the rest must be a call
    forced = lm.tok("Sure. <tool_call>", add_special_tokens=False)["input_ids"]
    for seed in range(2):
        g = decode(lm, prompt, serial, seed=seed, forced=forced, max_new=300)
        msg = parser.parse(text_of(lm, g))
        assert g.terminated and msg.content == "Sure." and len(msg.tool_calls) == 1  # one call, then only EOS
        call = msg.tool_calls[0]
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    g = decode(lm, prompt, parallel, seed=0, forced=forced, max_new=100)
    msg = parser.parse(text_of(lm, g))  # with parallel calls, text may follow a call
    assert (msg.content or "").startswith("Sure.") and msg.tool_calls
    jsonschema.validate(json.loads(msg.tool_calls[0].function.arguments), schemas[msg.tool_calls[0].function.name])


@torch.inference_mode()
def test_greedy_logprobs_are_the_log_softmax_of_the_logits(lm: Lm) -> None:
    prompt = chat_ids(lm, "Count to ten.")
    g = decode(lm, prompt, None, temperature=0, max_new=12, logprobs_k=5)
    ids = list(prompt)
    for token, entry in zip(g.tokens, g.logprobs, strict=True):
        full = lm.model(input_ids=torch.tensor([ids])).logits[0, -1, : lm.vocab]  # no cache, computed afresh
        expected = torch.log_softmax(full.float(), dim=-1)
        assert entry.chosen.token_id == token == entry.top[0].token_id  # greedy: the chosen one is the top one
        assert abs(entry.chosen.logprob - float(expected[token])) < 1e-4
        assert [c.token_id for c in entry.top] == torch.topk(expected, 5).indices.tolist()
        for c in entry.top:
            assert abs(c.logprob - float(expected[c.token_id])) < 1e-4
            assert c.token == lm.texts.text(c.token_id) and c.token_bytes == lm.texts.token_bytes(c.token_id)
        ids.append(token)
    # the bytes add up to the text (12 tokens may end inside a character: both sides then end in U+FFFD)
    assert b"".join(e.chosen.token_bytes for e in g.logprobs).decode(errors="replace") == lm.tok.decode(g.tokens)


def test_logprobs_under_a_grammar_are_renormalised_over_allowed_tokens(lm: Lm) -> None:
    """vLLM 0.32 applies the grammar bitmask before its sampler computes raw logprobs: so do we."""
    spec = json_schema_grammar(PERSON, param="p")
    g = decode(lm, chat_ids(lm, "JSON"), spec, temperature=0, max_new=8, logprobs_k=3)
    for row, entry in zip(g.masked_logits, g.logprobs, strict=True):
        allowed = torch.isfinite(row)
        assert abs(float(torch.logsumexp(torch.log_softmax(row, -1)[allowed], 0))) < 1e-5
        assert bool(allowed[entry.chosen.token_id])
    # the first step may only open the object: every other token has -inf
    first = g.logprobs[0]
    assert lm.texts.text(first.chosen.token_id).lstrip().startswith("{")


@torch.inference_mode()
def test_each_sequence_of_a_batched_step_masks_its_own_row(lm: Lm) -> None:
    """Two running sequences, one forward, different grammars: each matcher masks and advances only its row."""
    specs = [json_object_grammar(), json_schema_grammar({"type": "array", "items": {"type": "integer"}}, param="p")]
    matchers = [lm.compiler.matcher(s) for s in specs]
    alone = [lm.compiler.matcher(s) for s in specs]  # the same grammars, stepped one sequence at a time
    prompt = chat_ids(lm, "Go")
    inp = torch.tensor([prompt, prompt])
    cache = DynamicCache()
    eos = lm.compiler.stop_token_ids[0]
    outputs: list[list[int]] = [[], []]
    for _ in range(40):
        live = [i for i, m in enumerate(matchers) if not m.is_terminated()]
        if not live:
            break
        step = lm.model(input_ids=inp, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = step.past_key_values
        logits = step.logits[:, -1, : lm.vocab].float().clone()
        for i in live:
            matchers[i].mask_logits(logits[i])  # a view into the batch
        # a finished row keeps decoding padding (EOS) in the batch, unmasked, as a batched loop would
        chosen = [int(torch.argmax(logits[i])) if i in live else eos for i in range(2)]
        for i in live:
            own = step.logits[i, -1, : lm.vocab].float().clone()
            alone[i].mask_logits(own)
            assert torch.equal(torch.isfinite(own), torch.isfinite(logits[i]))
            alone[i].accept(chosen[i])
            matchers[i].accept(chosen[i])
            outputs[i].append(chosen[i])
        batch = batch_top_logprobs(logits, chosen, [2 if 0 in live else None, None])
        assert batch[1] is None
        if 0 in live:
            assert batch[0] == top_logprobs(logits[0], chosen[0], 2)
        inp = torch.tensor([[chosen[0]], [chosen[1]]])
    assert all(m.is_terminated() for m in matchers), "greedy decoding did not finish both documents in 40 steps"
    texts = [lm.tok.decode(o, skip_special_tokens=True) for o in outputs]
    assert isinstance(json.loads(texts[0]), dict)
    assert all(isinstance(x, int) for x in json.loads(texts[1]))


def test_compiler_and_compiled_grammars_are_cached(lm: Lm) -> None:
    assert GrammarCompiler.for_tokenizer(lm.tok, lm.vocab) is lm.compiler
    other = GrammarCompiler.for_tokenizer(lm.tok, lm.vocab + 64)  # a padded lm_head gets its own compiler
    assert other is not lm.compiler and other.vocab_size == lm.vocab + 64
    spec = json_schema_grammar({"type": "object", "properties": {"k": {"type": "integer"}}}, param="p")
    again = json_schema_grammar({"type": "object", "properties": {"k": {"type": "integer"}}}, param="p")
    assert lm.compiler.compile(spec) is lm.compiler.compile(again)


def test_padding_rows_and_misuse(lm: Lm) -> None:
    padded = GrammarCompiler.for_tokenizer(lm.tok, lm.vocab + 64).matcher(json_object_grammar())
    row = torch.zeros(lm.vocab + 64)
    padded.mask_logits(row)
    assert torch.isinf(row[lm.vocab :]).all() and torch.isfinite(row).any()
    m: SequenceMatcher = lm.compiler.matcher(json_object_grammar())
    with pytest.raises(ValueError, match="1-D logits row"):
        m.mask_logits(torch.zeros(2, lm.vocab))
    with pytest.raises(GrammarViolation):
        m.accept(lm.tok.convert_tokens_to_ids("<|im_end|>"))  # EOS before the object
    brace = lm.tok("{}", add_special_tokens=False)["input_ids"]
    for t in brace:
        m.accept(t)
    m.accept(lm.compiler.stop_token_ids[0])
    assert m.is_terminated()
    with pytest.raises(GrammarViolation, match="terminated"):
        m.mask_logits(torch.zeros(lm.vocab))
    m.reset()
    assert not m.is_terminated() and not m.is_completed()
