"""Grammar specs for constrained decoding: what an engine must constrain a generation to, as plain data.

The API layer builds one `GrammarSpec` per request from a JSON schema (`response_format: json_schema`, a tool's
parameters), the `json_object` mode, or a tool-call structure (an xgrammar structural tag, built by the tool-call
parser of the model's format). Building needs no tokenizer; it validates the schema (a 400 naming the parameter
and the unsupported feature) and converts it to EBNF with xgrammar. The EBNF is what every engine enforces: the
transformers engine compiles it against its tokenizer (`app.engines.grammar.matcher`), vLLM receives it as
`StructuredOutputsParams(grammar=...)` (`vllm_structured_outputs`), so both apply the same grammar by construction.
A spec (`GrammarSpec`, part of the engine protocol in `app.engines.base`) is a frozen dataclass of strings:
hashable (the compile cache key), and it pickles across Ray and torch.distributed.

xgrammar 0.2.8 lets raw control characters (U+0000-U+001F) into strings that have minLength/maxLength, which no
JSON parser accepts (measured: 7 of 25 sampled outputs of the tiny model failed `json.loads`); the EBNF is patched
here so that those strings exclude them as every other JSON string rule does.
"""

from __future__ import annotations

import json
import re
from typing import Any

from app.engines.base import GrammarKind, GrammarSpec, InvalidRequestError
from app.engines.grammar.install import require_xgrammar
from app.engines.grammar.json_schema import UnsupportedSchemaError, check_schema

JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}  # vLLM 0.32 compiles json_object from this schema too

# the character class xgrammar 0.2.8 prints for length-limited strings, and the one its other string rules use
_LOOSE_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\"\\\0-\x1f]'
_LOG_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")


def _finish(kind: GrammarKind, grammar: Any, source: str) -> GrammarSpec:
    ebnf = str(grammar).replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR)
    return GrammarSpec(kind, ebnf, source)


def _xgrammar_message(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _LOG_PREFIX.sub("", text)


def check_json_schema(schema: Any, *, param: str) -> None:
    """400 (naming `param`) unless `schema` is a JSON-schema object whose features constrained decoding enforces."""
    if isinstance(schema, bool) or not isinstance(schema, dict):
        raise InvalidRequestError(f"{param} must be a JSON schema object", param=param)
    try:
        check_schema(schema)
    except UnsupportedSchemaError as exc:
        raise InvalidRequestError(f"{param}: {exc}", param=param) from None


def json_schema_grammar(schema: dict[str, Any], *, param: str, any_whitespace: bool = True) -> GrammarSpec:
    """The grammar of JSON documents matching `schema` (strict: no properties or items the schema does not name,
    as vLLM 0.32 compiles it). Raises `InvalidRequestError(param=param)` for schemas it cannot enforce."""
    check_json_schema(schema, param=param)
    source = json.dumps(schema, ensure_ascii=False, sort_keys=False)
    xgr = require_xgrammar(param)
    try:
        grammar = xgr.Grammar.from_json_schema(source, any_whitespace=any_whitespace, strict_mode=True)
    except Exception as exc:  # xgrammar raises RuntimeError with the converter's message
        raise InvalidRequestError(f"{param}: invalid JSON schema: {_xgrammar_message(exc)}", param=param) from None
    return _finish("json_schema", grammar, source)


def json_object_grammar(*, any_whitespace: bool = True) -> GrammarSpec:
    """`response_format: {"type": "json_object"}`: any JSON object."""
    spec = json_schema_grammar(JSON_OBJECT_SCHEMA, param="response_format", any_whitespace=any_whitespace)
    return GrammarSpec("json_object", spec.ebnf, spec.source)


def structural_tag_grammar(tag: dict[str, Any], *, param: str) -> GrammarSpec:
    """The grammar of an xgrammar structural tag (`{"type": "structural_tag", "format": {...}}`), e.g. a tool-call
    format whose argument objects follow each function's parameters schema."""
    source = json.dumps(tag, ensure_ascii=False)
    xgr = require_xgrammar(param)
    try:
        grammar = xgr.Grammar.from_structural_tag(source)
    except Exception as exc:
        raise InvalidRequestError(f"{param}: cannot build the tool-call grammar: {_xgrammar_message(exc)}",
                                  param=param) from None
    return _finish("tool_calls", grammar, source)


def vllm_structured_outputs(spec: GrammarSpec) -> dict[str, Any]:
    """Keyword arguments of vLLM 0.32's `StructuredOutputsParams` that enforce `spec`:
    `SamplingParams(structured_outputs=StructuredOutputsParams(**vllm_structured_outputs(spec)))`.

    The EBNF goes as `grammar` (vLLM's xgrammar backend compiles it with `compile_grammar`, and backend "auto"
    picks xgrammar for it because `xgr.Grammar.from_ebnf` accepts it), so vLLM enforces exactly what the
    transformers engine enforces, control-character fix included."""
    return {"grammar": spec.ebnf}
