"""The base of every request model: strict types, unknown fields ignored.

OpenAI rejects "5" for an integer and "yes" for a boolean, where lax pydantic would coerce them; unknown fields
are ignored, as OpenAI-compatible servers do. (`app.api.protocol._Request` becomes this class at integration, so
request models outside protocol.py, such as the tool and response_format models, share it without a circular
import.)
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


def _check_name(v: str) -> str:
    if not _NAME.match(v):
        raise ValueError("names are 1-64 characters of a-z, A-Z, 0-9, underscores and dashes")
    return v


# OpenAI's rule for function names and response_format json_schema names
Name = Annotated[str, AfterValidator(_check_name)]
