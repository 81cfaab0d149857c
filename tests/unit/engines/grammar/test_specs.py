"""Grammar specs: building from schemas and structural tags, unsupported features as 400s, the vLLM mapping."""

from __future__ import annotations

import json
import pickle
from importlib.metadata import version

import pytest
import xgrammar as xgr
from pydantic import BaseModel, Field

from app.engines.base import InvalidRequestError
from app.engines.grammar.json_schema import MAX_NESTING, UnsupportedSchemaError, check_schema
from app.engines.grammar.specs import (
    GrammarSpec,
    json_object_grammar,
    json_schema_grammar,
    structural_tag_grammar,
    vllm_structured_outputs,
)
from tests.support.env import ROOT

pytestmark = pytest.mark.unit

PARAM = "response_format.json_schema.schema"


def obj(**props: dict) -> dict:
    return {"type": "object", "properties": props, "required": list(props)}


def accepts(ebnf: str, text: str) -> bool:
    """Whether the grammar matches `text` completely (xgrammar's own test helper, no tokenizer needed)."""
    return xgr.testing._is_grammar_accept_string(xgr.Grammar.from_ebnf(ebnf), text)


def test_installed_xgrammar_is_the_pinned_one() -> None:
    pinned = [line for line in (ROOT / "requirements-nodeps.txt").read_text().splitlines()
              if line.startswith("xgrammar==")]
    assert pinned == [f"xgrammar=={version('xgrammar')}"]


@pytest.mark.parametrize(("schema", "feature"), [
    (obj(x={"type": "array", "items": {"type": "integer"}, "uniqueItems": True}), "uniqueItems"),
    (obj(x={"type": "array", "contains": {"const": 5}}), "contains"),
    (obj(x={"type": "integer", "not": {"const": 0}}), "not"),
    ({**obj(a={"type": "integer"}), "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}},
     "if/then/else"),
    ({**obj(a={"type": "integer"}), "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
    ({"allOf": [obj(a={"type": "integer"}), obj(b={"type": "integer"})]}, "allOf"),
    (obj(x={"oneOf": [{"type": "integer", "maximum": 5}, {"type": "integer", "minimum": 3}]}), "oneOf"),
    (obj(x={"type": "number", "multipleOf": 0.5}), "multipleOf"),
    (obj(x={"type": "string", "format": "bogus"}), "format 'bogus'"),
    (obj(x={"type": "string", "pattern": "^a+$", "maxLength": 3}), "minLength/maxLength with pattern or format"),
    ({"type": "object", "propertyNames": {"pattern": "^a"}, "properties": {"a": {}}}, "propertyNames"),
    ({"type": "object", "patternProperties": {"^a": {}, "^b": {}}}, "patternProperties"),
    ({"$ref": "https://example.com/schema.json"}, "$ref"),
])
def test_features_xgrammar_would_ignore_are_refused_by_name(schema: dict, feature: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        json_schema_grammar(schema, param=PARAM)
    assert err.value.param == PARAM and err.value.status_code == 400
    assert f"JSON schema feature {feature!r} is not supported" in err.value.message
    assert err.value.message.startswith(PARAM + ": ")


def test_the_location_of_the_feature_is_named() -> None:
    with pytest.raises(UnsupportedSchemaError) as err:
        check_schema({"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}})
    assert err.value.path == "#/properties/tags" and "(at #/properties/tags)" in str(err.value)


def test_keyword_names_used_as_property_names_or_data_are_not_features() -> None:
    check_schema({"type": "object", "properties": {"not": {"type": "string"}, "if": {"type": "integer"}},
                  "default": {"uniqueItems": True}, "enum": [{"contains": 1}]})
    check_schema(obj(x={"type": "array", "uniqueItems": False}, n={"type": "integer", "multipleOf": 3}))


def test_too_deep_schemas_are_refused() -> None:
    deep: dict = {"type": "integer"}
    for _ in range(MAX_NESTING + 1):
        deep = {"type": "array", "items": deep}
    with pytest.raises(InvalidRequestError, match="nesting deeper than 64 levels"):
        json_schema_grammar(deep, param=PARAM)


def test_pydantic_schemas_with_discriminated_unions_and_refs_compile() -> None:
    from typing import Literal

    class Cat(BaseModel):
        kind: Literal["cat"]
        lives: int = Field(ge=0, le=9)

    class Dog(BaseModel):
        kind: Literal["dog"]
        good: bool

    class Owner(BaseModel):
        name: str = Field(max_length=20)
        pet: Cat | Dog = Field(discriminator="kind")
        pets: list[Cat | Dog] = Field(default_factory=list, max_length=3)
        nick: str | None = None

    schema = Owner.model_json_schema()
    assert "oneOf" in json.dumps(schema)
    spec = json_schema_grammar(schema, param=PARAM)
    assert spec.kind == "json_schema" and json.loads(spec.source) == schema


def test_schemas_xgrammar_refuses_become_400s_without_its_log_prefix() -> None:
    with pytest.raises(InvalidRequestError) as err:
        json_schema_grammar(obj(x={"type": "string", "minLength": 5, "maxLength": 2}), param=PARAM)
    assert err.value.message == f"{PARAM}: invalid JSON schema: minLength 5 is greater than maxLength 2"
    with pytest.raises(InvalidRequestError, match="must be a JSON schema object"):
        json_schema_grammar(True, param=PARAM)  # type: ignore[arg-type]


def test_length_limited_strings_exclude_control_characters() -> None:
    """xgrammar 0.2.8 lets U+0000-U+001F into strings with maxLength; the spec's EBNF must not."""
    schema = obj(x={"type": "string", "maxLength": 6})
    raw = str(xgr.Grammar.from_json_schema(json.dumps(schema)))
    fixed = json_schema_grammar(schema, param=PARAM).ebnf
    bad = '{"x": "a\x01b"}'
    assert accepts(raw, bad), "xgrammar fixed the bug: drop the patch in app.engines.grammar.specs"
    assert not accepts(fixed, bad)
    assert accepts(fixed, '{"x": "ab c"}') and not accepts(fixed, '{"x": "abcdefg"}')


def test_json_object_means_an_object() -> None:
    spec = json_object_grammar()
    assert spec.kind == "json_object"
    assert accepts(spec.ebnf, '{"a": [1, "x"]}') and not accepts(spec.ebnf, "[1, 2]")


def test_structural_tag_grammar_and_its_errors() -> None:
    tag = {"type": "structural_tag", "format": {
        "type": "tag", "begin": "<t>", "content": {"type": "json_schema", "json_schema": obj(a={"type": "integer"})},
        "end": "</t>"}}
    spec = structural_tag_grammar(tag, param="tools")
    assert spec.kind == "tool_calls"
    assert accepts(spec.ebnf, '<t>{"a": 3}</t>') and not accepts(spec.ebnf, '<t>{"a": "3"}</t>')
    with pytest.raises(InvalidRequestError) as err:
        structural_tag_grammar({"type": "structural_tag", "format": {"type": "nope"}}, param="tools")
    assert err.value.param == "tools" and "cannot build the tool-call grammar" in err.value.message


def test_specs_are_hashable_picklable_and_short_in_repr() -> None:
    a = json_schema_grammar(obj(x={"type": "integer"}), param=PARAM)
    b = json_schema_grammar(obj(x={"type": "integer"}), param=PARAM)
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert pickle.loads(pickle.dumps(a)) == a
    assert "chars>" in repr(a) and len(repr(a)) < 200


def test_vllm_gets_the_same_ebnf_as_grammar() -> None:
    spec = json_schema_grammar(obj(x={"type": "string", "maxLength": 4}), param=PARAM)
    kwargs = vllm_structured_outputs(spec)
    assert kwargs == {"grammar": spec.ebnf}
    # what vLLM 0.32 checks before choosing its xgrammar backend: EBNF (not Lark) that xgrammar parses
    assert "::=" in kwargs["grammar"]
    assert str(xgr.Grammar.from_ebnf(kwargs["grammar"])) == spec.ebnf
    assert isinstance(GrammarSpec("json_object", "root ::= \"{}\""), GrammarSpec)
