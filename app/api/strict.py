"""The base of every request model: strict types, unknown fields ignored.

OpenAI rejects "5" for an integer and "yes" for a boolean, where lax pydantic would coerce them; unknown fields
are ignored, as OpenAI-compatible servers do. (`app.api.protocol._Request` becomes this class at integration, so
request models outside protocol.py, such as the tool and response_format models, share it without a circular
import.)
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
