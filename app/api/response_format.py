"""`response_format` (structured output): request models and the grammar each one asks the engine to enforce.

- `{"type": "text"}`: no constraint.
- `{"type": "json_object"}`: any JSON object (OpenAI's JSON mode).
- `{"type": "json_schema", "json_schema": {"name", "description", "schema", "strict"}}`: JSON matching the
  schema. The schema is enforced whether or not `strict` is set (as vLLM does); a schema constrained decoding
  cannot enforce is a 400 naming `response_format.json_schema.schema` and the feature. Without `schema` the
  output is any JSON object.
Malformed values fail validation with the path of the offending field (`response_format.json_schema.name`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from app.api.strict import Name, RequestModel, Text
from app.engines.grammar.json_schema import check_metaschema
from app.engines.grammar.specs import GrammarSpec, json_object_grammar, json_schema_grammar

SCHEMA_PARAM = "response_format.json_schema.schema"


class JsonSchemaSpec(RequestModel):
    name: Name
    description: Text | None = None
    # `schema` shadows a BaseModel attribute: the field is schema_ with the wire name as alias
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _check_schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            check_metaschema(v)
        return v


class ResponseFormat(RequestModel):
    """One model for the three types (not a tagged union), so that errors name plain paths such as
    `response_format.type` and `response_format.json_schema`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = Field(default=None, validate_default=True)

    @field_validator("json_schema")
    @classmethod
    def _needed_for_json_schema(cls, v: JsonSchemaSpec | None, info: ValidationInfo) -> JsonSchemaSpec | None:
        if v is None and info.data.get("type") == "json_schema":
            raise ValueError("field required when type is json_schema")
        return v


class ResponseFormatFields(RequestModel):
    """The chat request's `response_format` (mixed into `ChatCompletionRequest` at integration)."""

    response_format: ResponseFormat | None = None

    def response_grammar(self) -> GrammarSpec | None:
        return response_format_grammar(self.response_format)


def response_format_grammar(fmt: ResponseFormat | None) -> GrammarSpec | None:
    """The grammar `fmt` asks for (None for text); `InvalidRequestError` naming the schema parameter when the
    schema has a feature constrained decoding cannot enforce."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object" or fmt.json_schema is None or fmt.json_schema.schema_ is None:
        return json_object_grammar()
    return json_schema_grammar(fmt.json_schema.schema_, param=SCHEMA_PARAM)
