"""The per-model serving knobs as every config source declares them, validated once: `ConfiguredKnobs`.

`ServingKnobs` (the engine protocol's plain fields) is what an `EngineSpec` carries. The sources a person writes —
the `LLM_*` settings, model config files, the `DS_*` settings — inherit `ConfiguredKnobs`, which adds the checks a
value must pass there (a `tool_call_parser` the kit knows), so each source refuses the same values the same way.
"""

from __future__ import annotations

from pydantic import field_validator

from app.api.tool_parsers import check_parser_name
from app.engines.base import ServingKnobs


class ConfiguredKnobs(ServingKnobs):
    """`ServingKnobs` with the checks of a hand-written config."""

    @field_validator("tool_call_parser")
    @classmethod
    def _known_tool_call_parser(cls, v: str) -> str:
        return check_parser_name(v)
