"""The combined schema: every registered fragment's keys, value checks, and the schema ``feda2v-tk schema`` prints.

Value checks use a small evaluator for the JSON Schema keywords config fragments use (types, ranges,
enums, ``anyOf``/``oneOf``, arrays and objects); it says what was expected in words and keeps
``validate`` from importing ``jsonschema`` (which costs more than the rest of the command). A property
using any other keyword is checked by ``jsonschema`` itself, and a test checks the evaluator against
``jsonschema`` on random values.

Schema annotations the toolkit reads:

``x-feda2v-component: generator | reducer | upsampler``
    the value must name a registered component of that kind (bare or ``plugin:name``).
``$defs.node_overrides.properties``
    keys only a per-node override in ``nodes`` may set.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from feda2v_toolkit.config.document import JsonPath, describe_found

if TYPE_CHECKING:
    pass

DRAFT = "https://json-schema.org/draft/2020-12/schema"
#: Keys of every generator section that belong to the toolkit itself (version bookkeeping).
VERSION_KEY = "schema_version"
PLUGIN_VERSIONS_KEY = "schema_versions"
GENERATOR_PREFIX = "generator_"
COMPONENT_ANNOTATION = "x-feda2v-component"
#: How close (difflib ratio) an unknown key must be to a known one to count as a misspelling.
TYPO_CUTOFF = 0.85

_TYPES = ("null", "boolean", "object", "array", "number", "string", "integer")
_ANNOTATIONS = frozenset({"description", "title", "default", "examples", "$comment", "deprecated",
                          "readOnly", "writeOnly", "$schema", "$id"})
#: Keywords the built-in evaluator implements.
_EVALUATED = frozenset({"type", "enum", "const", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                        "multipleOf", "minLength", "maxLength", "pattern", "items", "minItems", "maxItems",
                        "uniqueItems", "properties", "required", "additionalProperties", "anyOf", "oneOf",
                        "minProperties", "maxProperties"})


@dataclass(frozen=True)
class Problem:
    """One way a value fails its schema; ``path`` is relative to the checked value."""

    path: JsonPath
    message: str
    expected: str
    found: str


# -- JSON semantics ---------------------------------------------------------------------------------

def is_type(value: Any, name: str) -> bool:
    """JSON Schema type test (``true`` is not a number; ``4.0`` is an integer)."""
    if name == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer())
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "boolean":
        return isinstance(value, bool)
    if name == "string":
        return isinstance(value, str)
    if name == "null":
        return value is None
    if name == "array":
        return isinstance(value, list)
    if name == "object":
        return isinstance(value, dict)
    return False


def json_equal(a: Any, b: Any) -> bool:
    """JSON Schema equality: ``1 == 1.0`` but ``true != 1``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if is_type(a, "number") and is_type(b, "number"):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def strict_equal(a: Any, b: Any) -> bool:
    """Equal and of the same Python types throughout (``1`` and ``1.0`` differ): same JSON text."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(strict_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(strict_equal(a[k], b[k]) for k in a)
    return bool(a == b)


# -- describing schemas in words --------------------------------------------------------------------

def _num(value: Any) -> str:
    return json.dumps(value)


def _bounds(schema: Mapping[str, Any]) -> str:
    lo = (">=", schema["minimum"]) if "minimum" in schema else None
    if "exclusiveMinimum" in schema:
        lo = (">", schema["exclusiveMinimum"])
    hi = ("<=", schema["maximum"]) if "maximum" in schema else None
    if "exclusiveMaximum" in schema:
        hi = ("<", schema["exclusiveMaximum"])
    if lo and hi:
        return f" in {'[' if lo[0] == '>=' else '('}{_num(lo[1])}, {_num(hi[1])}{']' if hi[0] == '<=' else ')'}"
    if lo:
        return f" {lo[0]} {_num(lo[1])}"
    if hi:
        return f" {hi[0]} {_num(hi[1])}"
    return ""


_PLURAL = {"string": "strings", "integer": "integers", "number": "numbers", "boolean": "booleans",
           "object": "objects", "array": "arrays", "null": "nulls"}


def describe(schema: Any) -> str:
    """What a schema accepts, in words: ``integer >= 1 or null``, ``one of "unified", "per_class"``."""
    if schema is True or schema == {}:
        return "any value"
    if schema is False:
        return "nothing (the key is not allowed)"
    if not isinstance(schema, Mapping):
        return "a valid value"
    if "const" in schema:
        return json.dumps(schema["const"], ensure_ascii=False)
    if "enum" in schema:
        return "one of " + ", ".join(json.dumps(v, ensure_ascii=False) for v in schema["enum"])
    for combinator in ("anyOf", "oneOf"):
        if combinator in schema:
            return " or ".join(describe(s) for s in schema[combinator])
    types = schema.get("type")
    if types is None:
        return "a valid value"
    types = [types] if isinstance(types, str) else list(types)
    parts = []
    for t in types:
        if t in ("integer", "number"):
            parts.append(t + _bounds(schema))
        elif t == "array":
            text = "array"
            items = schema.get("items")
            if isinstance(items, Mapping) and items:
                inner = describe(items)
                inner = _PLURAL.get(inner, f"({inner}) items")
                n = schema.get("minItems")
                text = f"array of {n} {inner}" if n is not None and n == schema.get("maxItems") else f"array of {inner}"
            parts.append(text)
        elif t == "object" and isinstance(schema.get("additionalProperties"), Mapping) \
                and schema["additionalProperties"]:
            parts.append(f"object (name -> {describe(schema['additionalProperties'])})")
        else:
            parts.append(t)
    return " or ".join(parts)


# -- the evaluator ----------------------------------------------------------------------------------

def evaluable(schema: Any) -> bool:
    """Whether the built-in evaluator implements every keyword ``schema`` uses."""
    if isinstance(schema, bool):
        return True
    if not isinstance(schema, Mapping):
        return False
    for key, value in schema.items():
        if key in _ANNOTATIONS or key.startswith("x-"):
            continue
        if key not in _EVALUATED:
            return False
        if key in ("items", "additionalProperties") and not evaluable(value):
            return False
        if key == "properties" and not all(evaluable(s) for s in value.values()):
            return False
        if key in ("anyOf", "oneOf") and not all(evaluable(s) for s in value):
            return False
    return True


def check_value(schema: Any, value: Any, path: JsonPath = ()) -> list[Problem]:
    """Every way ``value`` fails ``schema`` (which must be :func:`evaluable`)."""
    if schema is True:
        return []
    if schema is False:
        return [Problem(path, "no value is allowed here", "nothing", describe_found(value))]
    found = describe_found(value)

    def fail(expected: str | None = None) -> list[Problem]:
        exp = expected or describe(schema)
        return [Problem(path, f"expected {exp}, found {found}", exp, found)]

    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else types
        if not any(is_type(value, t) for t in names):
            return fail()
    if "const" in schema and not json_equal(value, schema["const"]):
        return fail()
    if "enum" in schema and not any(json_equal(value, v) for v in schema["enum"]):
        return fail()
    out: list[Problem] = []
    if is_type(value, "number"):
        bad = (("minimum" in schema and value < schema["minimum"])
               or ("maximum" in schema and value > schema["maximum"])
               or ("exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"])
               or ("exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]))
        if bad:
            return fail()
        if "multipleOf" in schema and not _multiple_of(value, schema["multipleOf"]):
            return fail(f"a multiple of {_num(schema['multipleOf'])}")
    elif isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            return fail(f"string of at least {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            return fail(f"string of at most {schema['maxLength']} characters")
        if "pattern" in schema and re.search(schema["pattern"], value) is None:
            return fail(f"string matching {schema['pattern']!r}")
    elif isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            return fail(f"{describe(schema)} with at least {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            return fail(f"{describe(schema)} with at most {schema['maxItems']} items")
        if schema.get("uniqueItems"):
            for i, item in enumerate(value):
                if any(json_equal(item, other) for other in value[:i]):
                    out.append(Problem((*path, i), f"duplicate item {json.dumps(item, ensure_ascii=False)}",
                                       "unique items", describe_found(item)))
                    break
        if "items" in schema:
            for i, item in enumerate(value):
                out.extend(check_value(schema["items"], item, (*path, i)))
    elif isinstance(value, dict):
        if "minProperties" in schema and len(value) < schema["minProperties"]:
            return fail(f"object with at least {schema['minProperties']} keys")
        if "maxProperties" in schema and len(value) > schema["maxProperties"]:
            return fail(f"object with at most {schema['maxProperties']} keys")
        for key in schema.get("required", ()):
            if key not in value:
                out.append(Problem(path, f"missing required key {key!r}", f"object with {key!r}", found))
        props = schema.get("properties", {})
        for key, item in value.items():
            if key in props:
                out.extend(check_value(props[key], item, (*path, key)))
            elif "additionalProperties" in schema:
                out.extend(check_value(schema["additionalProperties"], item, (*path, key)))
    if "anyOf" in schema and not any(not check_value(s, value) for s in schema["anyOf"]):
        return fail()
    if "oneOf" in schema and sum(1 for s in schema["oneOf"] if not check_value(s, value)) != 1:
        return fail(f"exactly one of: {describe({'anyOf': schema['oneOf']})}")
    return out


def _multiple_of(value: float, divisor: float) -> bool:
    if isinstance(divisor, float) or isinstance(value, float):
        try:
            quotient = value / divisor
            return math.isfinite(quotient) and int(quotient) == quotient
        except (OverflowError, ZeroDivisionError):
            return False
    return value % divisor == 0


def check_with_jsonschema(schema: Any, value: Any, defs: Mapping[str, Any] | None = None) -> list[Problem]:
    """Check with the ``jsonschema`` library (for keywords the evaluator does not implement)."""
    from jsonschema import Draft202012Validator

    root = dict(schema) if isinstance(schema, Mapping) else schema
    if defs and isinstance(root, dict):
        root = {"$defs": dict(defs), **root}
    out = []
    for error in sorted(Draft202012Validator(root).iter_errors(value), key=lambda e: list(e.absolute_path)):
        found = describe_found(error.instance)
        out.append(Problem(tuple(error.absolute_path), error.message,
                           describe(error.schema) if isinstance(error.schema, Mapping) else "a valid value",
                           found))
    return out


# -- checking fragments at registration -------------------------------------------------------------

_META_SCHEMA_VALUED = ("items", "additionalProperties", "not", "contains", "propertyNames")
_META_SCHEMA_MAPS = ("properties", "$defs", "patternProperties")
_META_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf")
_META_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_META_NUMBERS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _plainly_valid(schema: Any) -> bool:
    """A cheap, conservative meta-check: True only for schemas that are certainly valid."""
    if isinstance(schema, bool):
        return True
    if not isinstance(schema, Mapping):
        return False
    for key, value in schema.items():
        if key.startswith("x-") or key in ("default", "const"):
            continue
        if key in ("description", "title", "$comment", "$schema", "$id"):
            ok = isinstance(value, str)
        elif key in ("deprecated", "readOnly", "writeOnly", "uniqueItems"):
            ok = isinstance(value, bool)
        elif key in ("examples", "enum"):
            ok = isinstance(value, list)
        elif key == "type":
            names = [value] if isinstance(value, str) else value
            ok = (isinstance(names, list) and bool(names) and len(set(map(str, names))) == len(names)
                  and all(isinstance(n, str) and n in _TYPES for n in names))
        elif key in _META_NUMBERS:
            ok = is_type(value, "number")
        elif key == "multipleOf":
            ok = is_type(value, "number") and value > 0
        elif key in _META_COUNTS:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        elif key == "pattern":
            try:
                ok = isinstance(value, str) and re.compile(value) is not None
            except re.error:
                ok = False
        elif key == "required":
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value) and len(set(value)) == len(value)
        elif key in _META_SCHEMA_VALUED:
            ok = _plainly_valid(value)
        elif key in _META_SCHEMA_MAPS:
            ok = isinstance(value, Mapping) and all(_plainly_valid(v) for v in value.values())
        elif key in _META_SCHEMA_LISTS:
            ok = isinstance(value, list) and bool(value) and all(_plainly_valid(v) for v in value)
        else:
            ok = False
        if not ok:
            return False
    return True


def check_fragment_schema(schema: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` if ``schema`` is not a valid draft 2020-12 schema.

    Plain schemas are recognised without importing ``jsonschema``; anything else is checked by
    ``jsonschema``'s meta-schema validation.
    """
    if _plainly_valid(schema):
        return
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(dict(schema))
    except SchemaError as exc:
        raise ValueError(exc.message) from None
