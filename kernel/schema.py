"""JSON schemas of tools: checked once when a tool enters the table, then validated
against in bounded time.

* :func:`check_schema` (MCP tools and served tools alike): size and depth limits, a valid
  Draft 2020-12 object schema, every ``$ref`` local (remote references are refused, never
  fetched) and inlined, every regular expression one RE2 accepts.
* :class:`ArgsValidator`: ``jsonschema``'s Draft 2020-12 validator with ``pattern``,
  ``patternProperties`` and ``additionalProperties`` matched by RE2 (linear time: no
  catastrophic backtracking), ``uniqueItems`` by hashing (not the pairwise fallback), no
  reference retrieval at all, and a time bound: every keyword checks the deadline, so a
  validation that runs past it stops with :class:`ValidationTimeout`.
"""

from __future__ import annotations

import contextvars
import json
import time
from collections.abc import Iterator
from typing import Any

import jsonschema
import re2
import referencing
import referencing.exceptions
from jsonschema import ValidationError

from syscalls import limits

#: Most nodes an inlined schema may have: references fanning out to references grow
#: exponentially, so the expansion stops here instead of taking the process with it.
MAX_INLINED_NODES = 20_000
#: Memory RE2 may use for one compiled pattern.
RE2_MAX_MEM = 8 << 20

_DEADLINE: contextvars.ContextVar[float] = contextvars.ContextVar("schema_deadline")


class ValidationTimeout(Exception):
    """A validation ran past its deadline."""


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of JSON ``value`` (stops counting past ``limit``)."""
    if limit < 0 or not isinstance(value, dict | list):
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(v, limit - 1) for v in items), default=0)


def _re2_options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False
    options.max_mem = RE2_MAX_MEM
    return options


def compile_pattern(pattern: str) -> Any:
    """``pattern`` compiled by RE2, or ValueError saying why RE2 refuses it (lookaround,
    backreferences: what cannot be matched in linear time)."""
    try:
        return re2.compile(pattern, _re2_options())
    except re2.error as exc:
        why = (
            exc.args[0].decode(errors="replace")
            if exc.args and isinstance(exc.args[0], bytes)
            else exc
        )
        raise ValueError(
            f"pattern {pattern[:80]!r} is refused ({why}): patterns are matched by RE2, "
            "without lookaround or backreferences"
        ) from None


def _patterns(node: Any) -> Iterator[str]:
    """Every regular expression of a schema: ``pattern`` values, ``patternProperties`` keys."""
    if isinstance(node, list):
        for v in node:
            yield from _patterns(v)
    elif isinstance(node, dict):
        if isinstance(node.get("pattern"), str):
            yield node["pattern"]
        if isinstance(node.get("patternProperties"), dict):
            yield from node["patternProperties"]
        for key, v in node.items():
            if key not in ("enum", "const", "default", "examples"):
                yield from _patterns(v)


def _has_key(node: Any, key: str) -> bool:
    if isinstance(node, list):
        return any(_has_key(v, key) for v in node)
    if isinstance(node, dict):
        return key in node or any(_has_key(v, key) for v in node.values())
    return False


def _inline_refs(
    node: Any, root: dict[str, Any], seen: tuple[str, ...] = (), budget: list[int] | None = None
) -> Any:
    """``node`` with every local ``$ref`` replaced by what it points to, so the schema
    stands alone inside another (the model's action schema); ValueError for a remote or
    recursive reference, or one that expands past MAX_INLINED_NODES."""
    budget = [MAX_INLINED_NODES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError(f"its $refs expand past {MAX_INLINED_NODES} schema nodes")
    if isinstance(node, list):
        return [_inline_refs(v, root, seen, budget) for v in node]
    if not isinstance(node, dict):
        return node
    for key in ("$ref", "$dynamicRef", "$recursiveRef"):
        ref = node.get(key)
        if ref is None:
            continue
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise ValueError(f"{key} {ref!r} is not local (remote references are refused)")
        if ref in seen:
            raise ValueError(f"{key} {ref!r} is recursive")
        target: Any = root
        for part in ref[1:].lstrip("/").split("/") if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise ValueError(f"{key} {ref!r} points nowhere")
            target = target[part]
        rest = {k: v for k, v in node.items() if k != key}
        resolved = _inline_refs(target, root, (*seen, ref), budget)
        if not rest:
            return resolved
        return {"allOf": [resolved, _inline_refs(rest, root, seen, budget)]}
    return {
        k: _inline_refs(v, root, seen, budget)
        for k, v in node.items()
        if k not in ("$defs", "definitions", "$id", "$schema", "$anchor", "$dynamicAnchor")
    }


def check_schema(schema: Any, what: str = "inputSchema") -> dict[str, Any]:
    """A tool's argument schema made fit for the tool table, or ValueError saying why it
    is refused: over the size or depth limit, not an object schema, invalid JSON Schema,
    a remote or recursive ``$ref``, or a pattern RE2 cannot match."""
    if not isinstance(schema, dict):
        raise ValueError(f"{what} is not an object")
    try:
        size = len(json.dumps(schema))
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{what} is not JSON ({exc})") from None
    if size > limits.MAX_MCP_SCHEMA_BYTES:
        raise ValueError(f"{what} is {size} bytes (at most {limits.MAX_MCP_SCHEMA_BYTES})")
    if _depth(schema, limits.MAX_MCP_SCHEMA_DEPTH) > limits.MAX_MCP_SCHEMA_DEPTH:
        raise ValueError(f"{what} nests deeper than {limits.MAX_MCP_SCHEMA_DEPTH} levels")
    if schema.get("type") != "object":
        raise ValueError(f"{what} must have type 'object'")
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        raise ValueError(f"{what} is not a valid JSON Schema: {exc.message}") from None
    inlined = _inline_refs(schema, schema)
    if len(json.dumps(inlined)) > limits.MAX_MCP_SCHEMA_BYTES:
        raise ValueError(f"{what} is over the size limit once its $refs are inlined")
    for pattern in _patterns(inlined):
        compile_pattern(pattern)
    if _has_key(inlined, "unevaluatedProperties") and _has_key(inlined, "patternProperties"):
        raise ValueError(f"{what}: unevaluatedProperties with patternProperties is not supported")
    return inlined


# -- validation -------------------------------------------------------------------------


def _canon(value: Any) -> Any:
    """A hashable form of JSON ``value`` equal exactly when JSON Schema calls two values
    equal (1 == 1.0; true != 1)."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, dict):
        return ("obj", frozenset((k, _canon(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("arr", tuple(_canon(v) for v in value))
    return value


def _timed(fn: Any) -> Any:
    def keyword(validator: Any, value: Any, instance: Any, schema: Any) -> Iterator[Any]:
        if time.monotonic() > _DEADLINE.get(float("inf")):
            raise ValidationTimeout
        return fn(validator, value, instance, schema) or ()

    return keyword


class ArgsValidator:
    """Validates a tool's arguments against its (checked) schema in bounded time."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.schema = schema
        self._compiled = {p: compile_pattern(p) for p in _patterns(schema)}
        own = {
            "pattern": self._pattern,
            "patternProperties": self._pattern_properties,
            "additionalProperties": self._additional_properties,
            "uniqueItems": self._unique_items,
        }
        base = jsonschema.Draft202012Validator
        table = {name: _timed(own.get(name, fn)) for name, fn in base.VALIDATORS.items()}
        cls = jsonschema.validators.extend(base, table)
        self._validator = cls(schema, registry=referencing.Registry(retrieve=_no_retrieval))

    def first_error(self, args: Any, budget_s: float) -> ValidationError | None:
        """The most relevant error of ``args`` (None: valid); ValidationTimeout past
        ``budget_s`` seconds."""
        token = _DEADLINE.set(time.monotonic() + budget_s)
        try:
            return jsonschema.exceptions.best_match(self._validator.iter_errors(args))
        except RecursionError:
            raise ValidationError("the arguments nest too deeply") from None
        finally:
            _DEADLINE.reset(token)

    # RE2 stand-ins for jsonschema's keywords that call ``re.search``
    def _search(self, pattern: str, text: str) -> bool:
        compiled = self._compiled.get(pattern)
        if compiled is None:  # every pattern was compiled at registration; belt and braces
            compiled = self._compiled[pattern] = compile_pattern(pattern)
        return compiled.search(text) is not None

    def _pattern(self, validator: Any, patrn: str, instance: Any, schema: Any) -> Iterator[Any]:
        if validator.is_type(instance, "string") and not self._search(patrn, instance):
            yield ValidationError(f"{instance[:80]!r} does not match {patrn!r}")

    def _pattern_properties(
        self, validator: Any, pp: dict[str, Any], instance: Any, schema: Any
    ) -> Iterator[Any]:
        if not validator.is_type(instance, "object"):
            return
        for pattern, subschema in pp.items():
            for k, v in instance.items():
                if self._search(pattern, k):
                    yield from validator.descend(v, subschema, path=k, schema_path=pattern)

    def _additional_properties(
        self, validator: Any, ap: Any, instance: Any, schema: Any
    ) -> Iterator[Any]:
        if not validator.is_type(instance, "object"):
            return
        properties = schema.get("properties", {})
        patterns = list(schema.get("patternProperties", {}))
        extras = [
            k
            for k in instance
            if k not in properties and not any(self._search(p, k) for p in patterns)
        ]
        if validator.is_type(ap, "object"):
            for extra in extras:
                yield from validator.descend(instance[extra], ap, path=extra)
        elif not ap and extras:
            shown = ", ".join(repr(e) for e in sorted(extras)[:8])
            yield ValidationError(f"additional properties are not allowed ({shown} unexpected)")

    @staticmethod
    def _unique_items(validator: Any, ui: Any, instance: Any, schema: Any) -> Iterator[Any]:
        if not ui or not validator.is_type(instance, "array"):
            return
        seen: set[Any] = set()
        for item in instance:
            key = _canon(item)
            if key in seen:
                yield ValidationError("the array has non-unique elements")
                return
            seen.add(key)


def _no_retrieval(uri: str) -> referencing.Resource[Any]:
    raise referencing.exceptions.NoSuchResource(ref=uri)
