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

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from app.api.strict import RequestModel
from app.engines.grammar import GrammarSpec, json_object_grammar, json_schema_grammar
from app.engines.json_schema_support import check_metaschema

SCHEMA_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for json_schema.name
SCHEMA_PARAM = "response_format.json_schema.schema"


class TextFormat(RequestModel):
    type: Literal["text"]


class JsonObjectFormat(RequestModel):
    type: Literal["json_object"]


class JsonSchemaSpec(RequestModel):
    name: str
    description: str | None = None
    # `schema` shadows a BaseModel attribute: the field is schema_ with the wire name as alias
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not SCHEMA_NAME.match(v):
            raise ValueError("names are 1-64 characters of a-z, A-Z, 0-9, underscores and dashes")
        return v

    @field_validator("schema_")
    @classmethod
    def _check_schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            check_metaschema(v)
        return v


class JsonSchemaFormat(RequestModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class ResponseFormatFields(RequestModel):
    """The chat request's `response_format` (mixed into `ChatCompletionRequest` at integration)."""

    response_format: ResponseFormat | None = None

    def response_grammar(self) -> GrammarSpec | None:
        return response_format_grammar(self.response_format)


def response_format_grammar(fmt: TextFormat | JsonObjectFormat | JsonSchemaFormat | None) -> GrammarSpec | None:
    """The grammar `fmt` asks for (None for text); `InvalidRequestError` naming the schema parameter when the
    schema has a feature constrained decoding cannot enforce."""
    if fmt is None or isinstance(fmt, TextFormat):
        return None
    if isinstance(fmt, JsonObjectFormat) or fmt.json_schema.schema_ is None:
        return json_object_grammar()
    return json_schema_grammar(fmt.json_schema.schema_, param=SCHEMA_PARAM)
