"""The SDK's call layer, driven by the syscall table and written once for both flavours.

A named SDK method (``Process.files.write``, ``memory.search``, ``send``…) is a *step*:
either one :class:`Op` (a syscall's name, arguments and deadline), or a generator that
yields ``Op``\\ s and receives their typed results (a method that makes several calls,
like ``reap``, or loops, like ``Tools.serve``). :func:`api` turns such a function into a
method; the handle it is called on runs the step with its own runner:

* blocking handles (``Client``, ``Process``…) run it to the end and return the value;
* asyncio handles (``AsyncClient``, ``AsyncProcess``…) return a coroutine that does.

Every ``Op`` is checked against ``SYSCALLS[name].args`` before it is sent (EINVAL
without a round trip; the kernel checks again, strictly) and its result parsed as
``SYSCALLS[name].result``. So adding a syscall to the SDK is one row in the table and,
optionally, one named method here — never a blocking and an asyncio copy.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from syscalls import codec, limits
from syscalls.errors import Errno, SyscallError
from syscalls.table import SYSCALLS

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Op:
    """One syscall to make. ``pid``/``token`` None: as the handle it runs on."""

    name: str
    args: dict[str, Any]
    deadline_ms: int | None = None
    pid: int | None = None
    token: str | None = None
    then: Callable[[Any], Any] | None = None  # what of the typed result the method returns


@dataclass(frozen=True, slots=True)
class Await:
    """A step's request to await something (an async tool handler); asyncio handles only."""

    awaitable: Awaitable[Any]


Step = Op | Generator[Op | Await, Any, Any]


def check_args(name: str, args: dict[str, Any]) -> None:
    """EINVAL naming the problem if ``args`` cannot be ``name``'s arguments.

    Lax (tuples for lists…): the kernel validates strictly again, so this only ever
    refuses what the kernel would refuse too."""
    spec = SYSCALLS.get(name)
    if spec is None:
        raise SyscallError.of(
            Errno.ENOSYS, f"no syscall named {name!r}; `llmos syscalls` lists them"
        )
    try:
        spec.args.model_validate(args, strict=False)
    except ValidationError as exc:
        raise SyscallError.of(
            Errno.EINVAL, codec.describe_validation(exc, model=spec.args)
        ) from None


def parse_result(name: str, raw: dict[str, Any]) -> BaseModel:
    """The kernel's result of ``name`` as its typed model."""
    try:
        return SYSCALLS[name].result(**raw)
    except ValidationError as exc:
        raise SyscallError.of(
            Errno.EPROTO, f"the kernel's {name} result does not match the ABI: {exc}"
        ) from None


def run_sync(step: Step, do: Callable[[Op], Any]) -> Any:
    """Run a step to its end with a blocking ``do(op) -> typed result``."""
    if isinstance(step, Op):
        value = do(step)
        return step.then(value) if step.then is not None else value
    try:
        request = next(step)
        while True:
            if isinstance(request, Await):
                step.close()
                raise TypeError("an async handler needs the asyncio SDK (AsyncProcess)")
            try:
                value = do(request)
            except SyscallError as exc:  # the step may handle it (e.g. ESRCH in reap)
                request = step.throw(exc)
                continue
            request = step.send(request.then(value) if request.then is not None else value)
    except StopIteration as stop:
        return stop.value


async def run_async(step: Step, do: Callable[[Op], Awaitable[Any]]) -> Any:
    """Run a step to its end with an asyncio ``do(op) -> typed result``."""
    if isinstance(step, Op):
        value = await do(step)
        return step.then(value) if step.then is not None else value
    try:
        request = next(step)
        while True:
            if isinstance(request, Await):
                try:
                    value = await request.awaitable
                except Exception as exc:  # a handler's error goes back into the step
                    request = step.throw(exc)
                    continue
                request = step.send(value)
                continue
            try:
                value = await do(request)
            except SyscallError as exc:
                request = step.throw(exc)
                continue
            request = step.send(request.then(value) if request.then is not None else value)
    except StopIteration as stop:
        return stop.value


def api(*syscalls: str) -> Callable[[Callable[..., Step]], Callable[..., Any]]:
    """Make a function that returns a step (making ``syscalls``) a method run by its
    handle's runner: a value on blocking handles, a coroutine on asyncio ones."""
    unknown = [name for name in syscalls if name not in SYSCALLS]
    if unknown:
        raise ValueError(f"not in the syscall table: {unknown}")

    def wrap(fn: Callable[..., Step]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def method(self: Any, *args: Any, **kw: Any) -> Any:
            return self._run(fn(self, *args, **kw))

        method.__llmos_syscalls__ = syscalls  # type: ignore[attr-defined]
        return method

    return wrap


def maybe_await(value: Any) -> Any:
    """Inside a step: ``value``, awaited first if it is awaitable (``yield from``)."""
    if inspect.isawaitable(value):
        value = yield Await(value)
    return value


# -- argument helpers shared by the named methods ---------------------------------------


def opt(**kw: Any) -> dict[str, Any]:
    """The keyword arguments that are set (None means: the syscall's default)."""
    return {k: v for k, v in kw.items() if v is not None}


def blocking_deadline_ms(timeout: float | None) -> int | None:
    """The deadline for a call that may wait ``timeout`` seconds: long enough for the
    wait to end on its own (never shorter than the default)."""
    if timeout is None:
        return None
    return min(max(limits.DEFAULT_DEADLINE_MS, int((timeout + 1) * 1000)), limits.MAX_DEADLINE_MS)


def wait_deadline_ms(timeout: float | None) -> int | None:
    """A deadline for a call that blocks up to ``timeout`` seconds: longer than it."""
    return None if timeout is None else int(timeout * 1000) + 5000


def response_format(value: Any) -> dict[str, Any]:
    """llm.generate's ``response_format`` from what the SDK accepts: the dict form as is, a
    pydantic model class as ``{"type": "json_schema", "schema": <its JSON Schema>}``, or
    one of the ABI's format models (``syscalls.models.ChoiceFormat(...)``...)."""
    if isinstance(value, dict):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump(by_alias=True)
    if isinstance(value, type) and issubclass(value, BaseModel):
        return {"type": "json_schema", "schema": value.model_json_schema()}
    raise TypeError(
        f"response_format must be a dict (e.g. {{'type': 'json_object'}}) or a pydantic model "
        f"class, not {type(value).__name__}"
    )


def generate_args(**kw: Any) -> dict[str, Any]:
    """llm.generate's arguments: unset ones left out, response_format in its wire form."""
    if kw.get("response_format") is not None:
        kw["response_format"] = response_format(kw["response_format"])
    return opt(**kw)


def spawn_args(
    name: str,
    system: str | None,
    model: str | None,
    nice: int,
    limits: dict[str, Any] | None,
    program_limits: dict[str, Any] | None,
    **options: Any,
) -> dict[str, Any]:
    """proc.spawn arguments with unset and default fields left out (the kernel fills them)."""
    from syscalls import models as m

    args = opt(
        name=name,
        system=system,
        model=model,
        nice=nice,
        limits=limits,
        program_limits=program_limits,
        **options,
    )
    try:
        parsed = m.SpawnArgs.model_validate(args, strict=False)
    except ValidationError as exc:
        raise SyscallError.of(
            Errno.EINVAL, codec.describe_validation(exc, model=m.SpawnArgs)
        ) from None
    return parsed.model_dump(exclude_none=True, exclude_defaults=True) | {"name": name}


def file_content(content: str | bytes) -> dict[str, Any]:
    """fs.write/append's content field: ``text`` for str, ``data`` for bytes."""
    if isinstance(content, str):
        return {"text": content}
    if isinstance(content, bytes | bytearray | memoryview):
        return {"data": bytes(content)}
    raise TypeError(f"file content must be str or bytes, not {type(content).__name__}")
