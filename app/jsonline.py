"""One-line JSON: the encoder for every line-framed stream we write (SSE events, batch JSONL output).

`json.dumps(..., ensure_ascii=False)` keeps U+0085, U+2028 and U+2029 raw. They are valid inside a JSON
string, but `str.splitlines()` and line readers built on it (httpx's `iter_lines`, many JSONL tools) treat
them as line ends, so a generated U+2028 would cut a record in two. Escaped, the JSON means the same.
"""

from __future__ import annotations

import json
from typing import Any

_LINE_BREAKERS = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def dumps_line(obj: Any, *, compact: bool = False) -> str:
    """JSON for `obj` with no character any common line splitter would break on (no trailing newline)."""
    separators = (",", ":") if compact else None
    return json.dumps(obj, ensure_ascii=False, separators=separators).translate(_LINE_BREAKERS)
