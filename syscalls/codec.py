"""The wire codec: msgpack with hard limits, and the request/reply envelopes.

Frames are single ZeroMQ message parts holding one msgpack map. A client sends each
request as a one-part message; the kernel may put several replies for the same socket
(chunks of the streams it has in flight) in one multipart message, one frame per part,
so a client reads frames with plain ``recv`` calls, one part at a time.

Request  ``{"v": ABI, "id": int, "call": str, "pid": int, "token": str,
            "deadline_ms": int | None, "args": {...}}``
Reply    ``{"id": int, "ok": True, "result": {...}}`` or
         ``{"id": int, "ok": False, "error": {"code": "EINVAL", "message": "..."}}``
Chunk    ``{"id": int, "seq": n, "chunk": {...}}`` (streaming syscalls; the reply with
         ``ok`` is always the final frame of a stream, and carries ``"seq"`` too).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any

import msgpack
from pydantic import BaseModel, ValidationError

from syscalls import limits
from syscalls.errors import Errno, SyscallError


@dataclass(frozen=True, slots=True)
class Request:
    """The envelope of every syscall (checked by hand: it is on every call's path)."""

    v: int
    id: int
    call: str
    pid: int = 0
    token: str = ""
    deadline_ms: int | None = None
    args: dict[str, Any] = field(default_factory=dict)


#: Envelope field -> (accepted type, description of the constraint) for error messages.
_FIELDS = {"v", "id", "call", "pid", "token", "deadline_ms", "args"}


def _int_in(value: Any, lo: int, hi: int) -> bool:
    return type(value) is int and lo <= value < hi


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not part of the ABI")


def packb(obj: Any) -> bytes:
    """Encode one frame."""
    return msgpack.packb(obj, use_bin_type=True)


def unpackb(frame: bytes) -> Any:
    """Decode one frame, refusing anything over the ABI's limits.

    Raises :class:`SyscallError` with E2BIG (too large) or EPROTO (not valid msgpack).
    """
    if len(frame) > limits.MAX_FRAME_BYTES:
        raise SyscallError(
            Errno.E2BIG,
            f"frame of {len(frame)} bytes exceeds the {limits.MAX_FRAME_BYTES}-byte limit",
        )
    try:
        return msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            ext_hook=_no_ext,
            max_str_len=limits.MAX_STR_BYTES,
            max_bin_len=limits.MAX_STR_BYTES,
            max_array_len=limits.MAX_ARRAY_ITEMS,
            max_map_len=limits.MAX_MAP_ITEMS,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise SyscallError(Errno.EPROTO, f"frame is not valid msgpack: {exc}") from None


def check_depth(obj: Any, limit: int) -> None:
    """EINVAL if maps and arrays in ``obj`` nest deeper than ``limit`` (no recursion)."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value
        if not isinstance(value, dict | list):
            continue
        if depth > limit:
            raise SyscallError(
                Errno.EINVAL, f"the frame nests maps and arrays deeper than {limit} levels"
            )
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


def salvage_id(obj: Any) -> int | None:
    """Best-effort request id from a frame that failed validation (to address the reply)."""
    if isinstance(obj, dict):
        rid = obj.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid < 2**63:
            return rid
    return None


def decode_request(frame: bytes) -> Request:
    """Frame -> validated :class:`Request`. Raises SyscallError (EPROTO, E2BIG,
    EPROTONOSUPPORT, EINVAL) for anything malformed."""
    obj = unpackb(frame)
    if not isinstance(obj, dict):
        raise SyscallError(Errno.EPROTO, "a request frame must be a msgpack map")
    check_depth(obj, limits.MAX_FRAME_DEPTH)
    version = obj.get("v")
    if version != limits.ABI_VERSION:
        raise SyscallError(
            Errno.EPROTONOSUPPORT,
            f"ABI version {version!r} is not supported; this kernel speaks version "
            f"{limits.ABI_VERSION} (upgrade the client or the kernel so they match)",
        )
    return _check_envelope(obj)


def _check_envelope(obj: dict[str, Any]) -> Request:
    def bad(why: str) -> SyscallError:
        return SyscallError(Errno.EPROTO, f"bad request envelope: {why}")

    if extra := set(obj) - _FIELDS:
        raise bad(f"unknown field(s) {sorted(map(str, extra))[:5]}")
    rid, call = obj.get("id"), obj.get("call")
    pid, token = obj.get("pid", 0), obj.get("token", "")
    deadline, args = obj.get("deadline_ms"), obj.get("args", {})
    if not _int_in(rid, 0, 2**63):
        raise bad("id must be an integer in [0, 2**63)")
    if type(call) is not str or not 0 < len(call) <= limits.MAX_NAME_CHARS:
        raise bad(f"call must be a syscall name of 1..{limits.MAX_NAME_CHARS} characters")
    if not _int_in(pid, 0, 2**31):
        raise bad("pid must be an integer in [0, 2**31)")
    if type(token) is not str or len(token) > limits.MAX_TOKEN_CHARS:
        raise bad(f"token must be a string of at most {limits.MAX_TOKEN_CHARS} characters")
    if deadline is not None and not _int_in(deadline, 1, limits.MAX_DEADLINE_MS + 1):
        raise bad(f"deadline_ms must be an integer in [1, {limits.MAX_DEADLINE_MS}] or null")
    if type(args) is not dict:
        raise bad("args must be a map")
    return Request(obj["v"], rid, call, pid, token, deadline, args)


def encode_request(
    rid: int,
    call: str,
    args: dict[str, Any],
    pid: int = 0,
    token: str = "",
    deadline_ms: int | None = None,
) -> bytes:
    """Build a request frame (used by the SDK)."""
    return packb(
        {
            "v": limits.ABI_VERSION,
            "id": rid,
            "call": call,
            "pid": pid,
            "token": token,
            "deadline_ms": deadline_ms,
            "args": args,
        }
    )


def ok_reply(rid: int | None, result: dict[str, Any], seq: int | None = None) -> bytes:
    """A successful final reply frame."""
    frame: dict[str, Any] = {"id": rid, "ok": True, "result": result}
    if seq is not None:
        frame["seq"] = seq
    return packb(frame)


def error_reply(rid: int | None, error: SyscallError, seq: int | None = None) -> bytes:
    """A failed final reply frame."""
    frame: dict[str, Any] = {"id": rid, "ok": False, "error": error.to_wire()}
    if seq is not None:
        frame["seq"] = seq
    return packb(frame)


def chunk_frame(rid: int, seq: int, chunk: dict[str, Any]) -> bytes:
    """One streamed chunk of a reply."""
    return packb({"id": rid, "seq": seq, "chunk": chunk})


def describe_validation(
    exc: ValidationError, limit: int = 3, model: type[BaseModel] | None = None
) -> str:
    """A short human sentence from a pydantic error (no input echo, bounded length). With
    the ``model`` validated, an unknown field's sentence lists the fields known there."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False)[:limit]:
        loc = tuple(err.get("loc", ()))
        where = ".".join(str(p) for p in loc) or "(root)"
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden" and model is not None:
            known = _fields_at(model, loc[:-1])
            if known:
                msg = f"unknown field; known fields: {', '.join(known)}"
        parts.append(f"{where}: {msg}")
    more = len(exc.errors()) - limit
    if more > 0:
        parts.append(f"and {more} more problem(s)")
    return "; ".join(parts)


def _fields_at(model: type[BaseModel], path: tuple[Any, ...]) -> list[str]:
    """The field names of the model found at ``path`` inside ``model`` (empty if none)."""
    current: Any = model
    for part in path:
        if isinstance(part, int):
            continue  # an index into a list: the same item model
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = _model_in(field.annotation)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (``Limits | None``, ``list[Entry]``...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (found := _model_in(arg)) is not None:
            return found
    return None
