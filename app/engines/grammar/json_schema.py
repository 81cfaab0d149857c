"""Which JSON-schema features constrained decoding enforces, and a 400 naming the first one it does not.

`check_metaschema` says what is wrong with a schema that is not a JSON schema at all (tool parameters and
response_format schemas); `check_schema` names the first feature of a valid schema that cannot be enforced.

xgrammar 0.2.8 (the grammar library behind both engines) refuses some schemas outright, but it silently ignores
other keywords: a grammar built from such a schema lets the model produce JSON the schema rejects. Those keywords
are refused here, before any engine sees the request, so that a `strict` schema is either enforced exactly or
refused with the feature's name, the same way on every engine.

The list was measured on xgrammar 0.2.8 (sampling the tiny random model under each grammar and validating the
output with `jsonschema`), and agrees with vLLM 0.32's `has_xgrammar_unsupported_json_features` (where vLLM falls
back to another backend instead): `uniqueItems`, `contains`/`minContains`/`maxContains`, `not`,
`if`/`then`/`else`, `dependentRequired`/`dependentSchemas`, `allOf` with more than one branch, `oneOf` whose
branches may overlap (treated as `anyOf`), `multipleOf` on non-integers, `pattern`/`format` combined with
`minLength`/`maxLength` (the lengths are dropped), string formats xgrammar does not know, `propertyNames` or
`patternProperties` combined with other object keywords, and `$ref`s outside the document.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

MAX_NESTING = 64  # objects/arrays in a schema document (vLLM 0.32's limit; OpenAI allows 10 levels)

# formats xgrammar 0.2.8 turns into a grammar (vLLM 0.32's STRING_SUPPORTED_FORMATS)
SUPPORTED_FORMATS = frozenset({
    "email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid", "uri", "uri-reference",
    "uri-template", "json-pointer", "relative-json-pointer",
})

_IGNORED_KEYWORDS = {
    "uniqueItems": "uniqueItems",
    "contains": "contains",
    "minContains": "minContains",
    "maxContains": "maxContains",
    "not": "not",
    "if": "if/then/else",
    "then": "if/then/else",
    "else": "if/then/else",
    "dependentRequired": "dependentRequired",
    "dependentSchemas": "dependentSchemas",
    "dependencies": "dependencies",
    "$dynamicRef": "$dynamicRef",
    "$recursiveRef": "$recursiveRef",
}

# keywords whose values are subschemas: one schema, a list of schemas, or a name -> schema map
_ONE = ("items", "additionalProperties", "unevaluatedProperties", "unevaluatedItems", "not", "if", "then", "else",
        "propertyNames", "contains", "additionalItems")
_LIST = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


class UnsupportedSchemaError(ValueError):
    """A schema feature constrained decoding cannot enforce; `feature` names it, `path` says where it is."""

    def __init__(self, feature: str, path: str, hint: str = ""):
        self.feature, self.path = feature, path
        where = f" (at {path})" if path != "#" else ""
        super().__init__(f"JSON schema feature {feature!r} is not supported{where}{': ' + hint if hint else ''}")


def check_metaschema(schema: dict[str, Any]) -> None:
    """ValueError saying what is wrong when `schema` is not a valid JSON schema (draft 2020-12 metaschema)."""
    from jsonschema import Draft202012Validator, SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise ValueError(f"not a valid JSON schema: {exc.message}" + (f" (at {where})" if where else "")) from None


def check_schema(schema: Any) -> None:
    """Raise `UnsupportedSchemaError` for the first feature of `schema` constrained decoding cannot enforce."""
    if _too_deep(schema, MAX_NESTING):
        raise UnsupportedSchemaError(f"nesting deeper than {MAX_NESTING} levels", "#")
    for path, node in _subschemas(schema, "#"):
        _check_node(node, path, schema)


def _too_deep(doc: Any, limit: int) -> bool:
    level = [doc]
    for _ in range(limit):
        level = [c for n in level if isinstance(n, dict | list)
                 for c in (n.values() if isinstance(n, dict) else n) if isinstance(c, dict | list)]
        if not level:
            return False
    return True


def _subschemas(node: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema object in the document (data such as `enum`, `const`, `default` is not walked)."""
    if not isinstance(node, dict):
        return
    yield path, node
    for key in _ONE:
        if isinstance(node.get(key), dict):
            yield from _subschemas(node[key], f"{path}/{key}")
    for key in _LIST:
        if isinstance(node.get(key), list):
            for i, sub in enumerate(node[key]):
                yield from _subschemas(sub, f"{path}/{key}/{i}")
    for key in _MAP:
        if isinstance(node.get(key), dict):
            for name, sub in node[key].items():
                yield from _subschemas(sub, f"{path}/{key}/{name}")


def _types(node: dict[str, Any]) -> set[str]:
    t = node.get("type")
    if isinstance(t, str):
        return {t}
    if isinstance(t, list):
        return {x for x in t if isinstance(x, str)}
    return set()


def _check_node(node: dict[str, Any], path: str, root: Any) -> None:
    for key, feature in _IGNORED_KEYWORDS.items():
        if key in node and not (key == "uniqueItems" and node[key] is False):
            raise UnsupportedSchemaError(feature, path)
    types = _types(node)
    if "multipleOf" in node and types != {"integer"}:
        raise UnsupportedSchemaError("multipleOf", path, "only enforced for type integer")
    ref = node.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        raise UnsupportedSchemaError("$ref", path, f"only references inside the schema (#/...) are, not {ref!r}")
    if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
        raise UnsupportedSchemaError("allOf", path, "with more than one branch")
    if isinstance(node.get("oneOf"), list) and not _disjoint(node["oneOf"], root):
        raise UnsupportedSchemaError("oneOf", path, "its branches may overlap (use anyOf, or a discriminator)")
    fmt = node.get("format")
    if isinstance(fmt, str) and fmt not in SUPPORTED_FORMATS and (not types or "string" in types):
        known = ", ".join(sorted(SUPPORTED_FORMATS))
        raise UnsupportedSchemaError(f"format {fmt!r}", path, f"supported formats: {known}")
    if ("pattern" in node or "format" in node) and ("minLength" in node or "maxLength" in node):
        raise UnsupportedSchemaError("minLength/maxLength with pattern or format", path)
    names = node.get("propertyNames")
    if names is not None:
        others = any(k in node for k in ("properties", "patternProperties"))
        if others or node.get("unevaluatedProperties", True) is not True:
            raise UnsupportedSchemaError("propertyNames", path, "combined with properties or patternProperties")
    patterns = node.get("patternProperties")
    if isinstance(patterns, dict) and ("properties" in node or len(patterns) > 1):
        raise UnsupportedSchemaError("patternProperties", path, "combined with properties, or more than one pattern")


def _resolve(node: Any, root: Any) -> Any:
    """Follow local `$ref`s (a few hops) so that oneOf branches written as references can be compared."""
    for _ in range(8):
        if not (isinstance(node, dict) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#")):
            return node
        target: Any = root
        for part in node["$ref"][1:].split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            target = target.get(part) if isinstance(target, dict) else None
        node = target
    return node


def _disjoint(branches: list[Any], root: Any) -> bool:
    """True when no JSON value can match two branches, by one of two simple proofs: every branch has a single,
    different `type`; or every branch is an object with a common required property whose `const` (or one-value
    `enum`) differs from branch to branch (what pydantic's discriminated unions produce)."""
    resolved = [_resolve(b, root) for b in branches]
    if not all(isinstance(b, dict) for b in resolved):
        return False
    if len(resolved) <= 1:
        return True
    single = [_types(b) for b in resolved]
    if all(len(t) == 1 for t in single) and len({next(iter(t)) for t in single}) == len(single):
        return True
    tags = [_discriminators(b) for b in resolved]
    for prop in set.intersection(*(set(t) for t in tags)):
        values = [repr(t[prop]) for t in tags]
        if len(set(values)) == len(values):
            return True
    return False


def _discriminators(branch: dict[str, Any]) -> dict[str, Any]:
    required = set(branch.get("required") or [])
    out = {}
    for name, sub in (branch.get("properties") or {}).items():
        if name in required and isinstance(sub, dict):
            if "const" in sub:
                out[name] = sub["const"]
            elif isinstance(sub.get("enum"), list) and len(sub["enum"]) == 1:
                out[name] = sub["enum"][0]
    return out
