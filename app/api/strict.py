"""The base of every request model (strict types, unknown fields ignored) and its scalar types.

OpenAI rejects "5" for an integer and "yes" for a boolean, where lax pydantic would coerce them; unknown fields
are ignored, as OpenAI-compatible servers do. `Text` is a string that must be valid Unicode, `Int` an integer
that may arrive as 2.0 (JSON's view), `Name` OpenAI's rule for function and schema names. Every request model
(`app.api.protocol`, and the tool, response_format and logprobs fields mixed into it) is built from these.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

INVALID_UNICODE = "invalid_unicode"


def _valid_unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError(
            INVALID_UNICODE, "invalid Unicode: lone surrogate U+{code} at character {pos} (send UTF-8 text)",
            {"code": f"{ord(value[exc.start]):04X}", "pos": exc.start},
        ) from None
    return value


# Every request string: a lone surrogate ("\\udc00" is valid JSON, not Unicode) is a 400 naming the field
Text = Annotated[str, AfterValidator(_valid_unicode)]


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# JSON (and JSON Schema, hence the OpenAPI document) count 2.0 as an integer; strict pydantic would not.
# "2", true and 2.5 stay refused. Constraints go before it (`Annotated[int, Field(ge=1), INTEGRAL]`) so
# that they reach the JSON schema as `minimum`/`maximum`.
INTEGRAL = BeforeValidator(_integral)
Int = Annotated[int, INTEGRAL]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


# a signed 64-bit integer (vLLM's range for `seed`), its bounds in the JSON schema and compared exactly: a JSON
# number beyond them is refused even where a validator working in doubles rounds it onto a bound
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX), INTEGRAL]

NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
_NAME = re.compile(NAME_PATTERN)


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


def _check_name(v: str) -> str:
    if not _NAME.match(v):
        raise ValueError("names are 1-64 characters of a-z, A-Z, 0-9, underscores and dashes")
    return v


# OpenAI's rule for function names and response_format json_schema names
Name = Annotated[str, AfterValidator(_check_name), Field(json_schema_extra={"pattern": NAME_PATTERN})]
