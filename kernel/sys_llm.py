"""llm.generate: run a process's generation on a slot of its model.

The process is READY while it waits for a slot and RUNNING while it holds one. Two
things can take the slot away mid-generation, both at a token boundary by aborting the
driver request: SIGSTOP (the process parks until SIGCONT) and the scheduler's
preemption (a plan of the scheduler flagged the slot, ``Slot.preempt``; the process goes
back to the run queue). Either way the tokens made so far are kept and the generation
resumes from them (``resume_ids``), so its text is exactly what an uninterrupted run
would give; the re-prefill is the context switch's cost and is counted. The context
changes only when a generation completes: a killed, timed-out or failed call leaves it
as it was. Quotas (kernel/quota.py) are charged to the process and its program. A
``response_format`` is checked and compiled by the driver before the process queues
for a slot, so a bad schema costs no slot time and fails with EINVAL.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from drivers.base import (
    Delta,
    Driver,
    DriverError,
    FormatError,
    GenerationRequest,
    ResponseFormat,
    SamplingOptions,
    UnsupportedError,
)
from drivers.grammar import schema_text
from kernel import context
from kernel.process import SIGNAL_STATUS, Proc, ProcState
from kernel.quota import Account
from kernel.syscall import Call
from kernel.toolcall import action_schema, parse_action, tool_guide
from syscalls import models as m
from syscalls.errors import Errno, SyscallError

if TYPE_CHECKING:
    from kernel.kernel import Kernel

_request_ids = itertools.count(1)

#: Weight of the newest call in a process's moving average of output tokens.
EWMA = 0.3
#: Streamed text is sent at once for the first chunk, then at most this often: at
#: thousands of tokens/s one frame per token would cost more than the tokens.
CHUNK_INTERVAL_S = 0.02


@dataclass(eq=False)
class Generation:
    """One llm.generate call's state across its stretches on slots."""

    prompt: list[dict[str, str]] | str
    sampling: SamplingOptions
    stream: bool
    out_ids: list[int] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)
    preempted: bool = False  # the scheduler asked for the slot back
    cached: int = 0  # prompt tokens the driver reused from its prefix cache, all stretches
    unsent: list[str] = field(default_factory=list)  # streamed text not yet sent
    last_chunk: float | None = None  # when the last chunk was sent

    def send_text(self, call: Call, text: str, final: bool = False) -> None:
        """Stream ``text``: the first piece at once, then batched every CHUNK_INTERVAL_S."""
        if text:
            self.unsent.append(text)
        now = time.monotonic()
        if self.unsent and (
            final or self.last_chunk is None or now - self.last_chunk >= CHUNK_INTERVAL_S
        ):
            call.chunk({"text": "".join(self.unsent)})
            self.unsent.clear()
            self.last_chunk = now


async def sys_generate(k: Kernel, call: Call, a: m.GenerateArgs) -> m.GenerateResult:
    proc = call.caller.proc
    assert proc is not None
    if proc.busy:
        raise SyscallError(
            Errno.EBUSY, f"process {proc.pid} is already generating; one call at a time"
        )
    proc.busy = True
    try:
        return await _generate(k, call, proc, a)
    finally:
        proc.busy = False
        if proc.alive and proc.state in (ProcState.READY, ProcState.RUNNING, ProcState.NEW):
            k.procs.idle(proc)
        elif proc.alive and proc.state is ProcState.STOPPED:
            k.procs.idle_when_continued(proc)  # ended while stopped: SIGCONT finds it idle
        if proc.alive and proc.term_pending:
            k.terminate(proc, SIGNAL_STATUS["TERM"], "TERM")


async def _generate(k: Kernel, call: Call, proc: Proc, a: m.GenerateArgs) -> m.GenerateResult:
    accounts = (proc.account, proc.program.account)
    for acct in accounts:
        acct.admit_call()
    if k.residency.state(proc.model) != "ready" and proc.state in (
        ProcState.NEW,
        ProcState.WAITING,
    ):
        k.procs.ready(proc)  # runnable, waiting for its model to load or wake
    async with k.use_model(
        proc.model
    ) as driver:  # a sleeping model wakes; it stays in until we finish
        return await _generate_on(k, call, proc, a, driver, accounts)


async def _generate_on(
    k: Kernel,
    call: Call,
    proc: Proc,
    a: m.GenerateArgs,
    driver: Driver,
    accounts: tuple[Account, ...],
) -> m.GenerateResult:
    tools = [k.tools.lookup(proc, name) for name in dict.fromkeys(a.tools)] if a.tools else []
    fmt = (
        _response_format(a.response_format)
        if not tools
        else ResponseFormat("json_schema", schema_text(action_schema(tools)))
    )
    if fmt is not None:
        try:
            await driver.prepare_format(fmt)
        except DriverError as exc:
            raise _driver_error(proc, exc) from None
    new = [msg.model_dump() for msg in a.messages] if a.messages is not None else []
    if new:
        context.check_room(k, proc, new)
    limit = context.window(proc, driver)
    if a.prompt is None:
        evicted = proc.evicted  # fit changes the context only by evicting (counted here)
        prompt, n_prompt = await context.fit(
            proc,
            k.memory,
            driver,
            new,
            a.max_tokens,
            lambda chat: _summarize(k, call, proc, driver, chat, limit),
        )
        if proc.evicted != evicted:
            k.persist.saved(proc)  # turns moved out stay moved out even if this call fails
    else:
        prompt, n_prompt = a.prompt, await context.count_tokens(driver, a.prompt)
        if n_prompt >= limit:
            raise SyscallError(
                Errno.E2BIG,
                f"the prompt is {n_prompt} tokens but {proc.model}'s window is {limit}; shorten it",
            )
    if tools:  # the tools are described to the model for this call only (not kept in the context)
        guide = {"role": "system", "content": tool_guide(tools)}
        prompt = (
            [*prompt[:-1], guide, prompt[-1]] if isinstance(prompt, list) and prompt else prompt
        )
        n_prompt += await context.count_tokens(driver, guide["content"])
        if n_prompt >= limit:
            raise SyscallError(
                Errno.E2BIG,
                f"the prompt with the tools' descriptions is {n_prompt} tokens; "
                f"{proc.model}'s window is {limit}: offer fewer tools",
            )
    for acct in accounts:
        acct.check_context(n_prompt)
    proc.generate_calls += 1
    sampling = dict(temperature=a.temperature, top_p=a.top_p, stop=tuple(a.stop), seed=a.seed)
    want = min(a.max_tokens, limit - n_prompt)
    gen, last = await complete(
        k, call, proc, driver, prompt, want, a.stream, **sampling, response_format=fmt
    )
    text = "".join(gen.parts)
    proc.prompt_tokens += last.prompt_tokens
    proc.mean_output = (
        last.output_tokens
        if proc.mean_output is None
        else ((1 - EWMA) * proc.mean_output + EWMA * last.output_tokens)
    )
    if a.messages is not None:
        turns = [*new, {"role": "assistant", "content": text}]
        proc.context.extend(turns)
        k.memory.record(proc, turns)
    k.persist.saved(proc)
    if a.prompt is None:  # the reply promises the new context is on disk
        await k.persist.barrier()
    # A raw-prompt call leaves the context as it was: its usage counters are written
    # behind the reply, and the caller does not wait for a commit it was not promised.
    usage = m.Usage(
        prompt_tokens=last.prompt_tokens, output_tokens=last.output_tokens, cached_tokens=gen.cached
    )
    calls, answer = parse_action(text) if tools else ([], None)
    return m.GenerateResult(
        text=text, finish_reason=last.finish_reason, usage=usage, tool_calls=calls, answer=answer
    )


def _response_format(
    arg: m.JsonSchemaFormat
    | m.JsonObjectFormat
    | m.ChoiceFormat
    | m.RegexFormat
    | m.GrammarFormat
    | None,
) -> ResponseFormat | None:
    """The ABI's response_format as the drivers take it."""
    match arg:
        case None:
            return None
        case m.JsonSchemaFormat():
            return ResponseFormat("json_schema", schema_text(arg.schema_))
        case m.JsonObjectFormat():
            return ResponseFormat("json_object")
        case m.ChoiceFormat():
            return ResponseFormat("choice", choices=tuple(arg.choices))
        case m.RegexFormat():
            return ResponseFormat("regex", arg.pattern)
        case m.GrammarFormat():
            return ResponseFormat("grammar", arg.ebnf)


def _driver_error(proc: Proc, exc: DriverError) -> SyscallError:
    """A driver's failure as the caller sees it: its own mistake (EINVAL), an option the
    driver lacks (ENOTSUP), or the model failing (EIO)."""
    if isinstance(exc, FormatError):
        return SyscallError(Errno.EINVAL, f"response_format: {exc}")
    if isinstance(exc, UnsupportedError):
        return SyscallError(Errno.ENOTSUP, f"{proc.model}: {exc}")
    return SyscallError(Errno.EIO, f"{proc.model}: {exc}")


async def complete(
    k: Kernel,
    call: Call,
    proc: Proc,
    driver: Driver,
    prompt: list[dict[str, str]] | str,
    want: int,
    stream: bool,
    **sampling: Any,
) -> tuple[Generation, Delta]:
    """Generate for ``proc`` with its quotas: reserve output tokens, run on slots (with
    preemption, STOP/CONT, wall limit), settle what was used. Returns the generation and
    its last delta."""
    accounts = (proc.account, proc.program.account)
    grants = _reserve(accounts, want)
    gen = Generation(prompt, SamplingOptions(max_tokens=grants[-1], **sampling), stream)
    try:
        last = await _within_wall(proc, _run(k, call, proc, driver, gen))
    finally:
        for acct, granted in zip(accounts, grants, strict=True):
            acct.settle(
                granted, len(gen.out_ids)
            )  # tokens made stay charged even if the call failed
    if gen.stream:
        gen.send_text(call, "", final=True)  # the rest, before the reply ends the stream
    return gen, last


async def _summarize(
    k: Kernel, call: Call, proc: Proc, driver: Driver, chat: list[dict[str, str]], limit: int
) -> str:
    """The model's running summary for ``proc`` (context policy ``summarize``), greedy,
    on the process's own slot time and quotas. An over-long transcript keeps its end."""
    room = limit - context.SUMMARY_TOKENS
    for _ in range(6):
        n = await context.count_tokens(driver, chat)
        if n <= room:
            break
        body = chat[-1]["content"]
        keep = max(int(len(body) * room / n * 0.9), 1)
        chat = [*chat[:-1], {"role": "user", "content": "[...]" + body[-keep:]}]
    else:
        raise SyscallError(Errno.E2BIG, f"could not fit the summary prompt in {limit} tokens")
    gen, _ = await complete(
        k, call, proc, driver, chat, context.SUMMARY_TOKENS, False, temperature=0.0
    )
    return "".join(gen.parts).strip()


def _reserve(accounts: tuple[Account, ...], want: int) -> list[int]:
    """Reserve output tokens in every account (each may grant fewer); all or nothing."""
    grants: list[int] = []
    try:
        for acct in accounts:
            want = acct.reserve(want)
            grants.append(want)
    except SyscallError:
        for acct, granted in zip(accounts, grants, strict=False):
            acct.settle(granted, 0)
        raise
    return grants


async def _within_wall(proc: Proc, work: Coroutine[Any, Any, Delta]) -> Delta:
    """Run ``work`` but no longer than the process's or program's max_wall_s allows."""
    accounts = (proc.account, proc.program.account)
    lefts = [x for x in (acct.wall_left() for acct in accounts) if x is not None]
    if not lefts:
        return await work
    try:
        async with asyncio.timeout(max(min(lefts), 0.0)):
            return await work
    except TimeoutError:
        over = min(
            accounts,
            key=lambda acct: acct.wall_left() if acct.wall_left() is not None else float("inf"),
        )
        raise over.wall_exceeded() from None


async def _run(k: Kernel, call: Call, proc: Proc, driver: Driver, gen: Generation) -> Delta:
    """Stretches on slots until the generation finishes; parks while STOPPED, goes back
    to the run queue when preempted."""
    expected = round(min(proc.mean_output or gen.sampling.max_tokens, gen.sampling.max_tokens))
    while True:
        await proc.cont.wait()  # a STOPPED process holds no slot
        gen.preempted = False
        last = await _run_on_slot(k, call, proc, driver, gen, expected)
        if last.finish_reason != "abort":
            return last
        if gen.preempted:
            proc.preemptions += 1
        elif proc.state is not ProcState.STOPPED:
            raise SyscallError(
                Errno.ECANCELED, f"the driver aborted process {proc.pid}'s generation"
            )


async def _run_on_slot(
    k: Kernel, call: Call, proc: Proc, driver: Driver, gen: Generation, expected: int
) -> Delta:
    """Hold a slot for one uninterrupted stretch of generation; return the last delta."""
    # A constrained generation on a driver that cannot resume its grammar keeps its slot.
    preemptible = gen.sampling.response_format is None or driver.resumes_formats
    slot = await k.scheduler.acquire(
        proc, expected_tokens=max(expected - len(gen.out_ids), 1), preemptible=preemptible
    )
    rid = f"{proc.pid}.{next(_request_ids)}"
    resumed = len(gen.out_ids)
    request = GenerationRequest(
        rid,
        gen.prompt,
        gen.sampling,
        priority=-proc.nice,
        resume_ids=list(gen.out_ids),
        adapter=proc.adapter,
    )
    k.running[proc.pid] = rid
    started = time.monotonic()
    last: Delta | None = None
    try:
        stream = driver.generate(request)
        try:
            async for delta in stream:
                if last is None:  # the driver has read the prompt (and any resumed tokens)
                    k.stats.add_prompt(delta.prompt_tokens + resumed - delta.cached_tokens)
                    k.stats.cached += delta.cached_tokens
                    gen.cached += delta.cached_tokens
                    if resumed:  # a context switch: what the driver had to compute again
                        proc.switch_prefill_tokens += (
                            delta.prompt_tokens + resumed - delta.cached_tokens
                        )
                        proc.switch_s += time.monotonic() - started
                k.stats.add_output(len(delta.token_ids))
                proc.account.charge(len(delta.token_ids))
                proc.program.account.charge(len(delta.token_ids))
                gen.out_ids.extend(delta.token_ids)
                slot.tokens += len(delta.token_ids)
                if delta.text:
                    gen.parts.append(delta.text)
                    if gen.stream:
                        gen.send_text(call, delta.text)
                last = delta
                # The scheduler decides preemption in its plan; here, two int/None tests a token.
                if slot.tokens >= slot.next_check:
                    k.scheduler.tick(slot)  # due for a look: the plan may flag this slot
                if slot.preempt is not None and delta.finish_reason is None and not gen.preempted:
                    gen.preempted = True
                    driver.abort(rid)  # the stream ends with "abort" within one step
        finally:
            await stream.aclose()  # aborts the request if we are cancelled mid-stream
    except DriverError as exc:
        raise _driver_error(proc, exc) from None
    finally:
        if k.running.get(proc.pid) == rid:
            del k.running[proc.pid]
        k.scheduler.release(slot)
    if last is None or last.finish_reason is None:
        raise SyscallError(
            Errno.EIO, f"{proc.model}: the driver ended a generation without a finish reason"
        )
    return last


def sys_cancel(k: Kernel, call: Call, a: m.CancelArgs) -> m.CancelResult:
    proc = k.procs.target(call.caller, a.pid)
    who = "the admin" if call.caller.admin else f"process {call.caller.pid}"
    n = k.interrupt_calls(
        proc.pid,
        "llm.generate",
        SyscallError(
            Errno.ECANCELED,
            f"the generation of process {proc.pid} was cancelled by {who} (llm.cancel); "
            "the process goes on",
        ),
    )
    return m.CancelResult(pid=proc.pid, cancelled=n)


HANDLERS = {"llm.generate": sys_generate, "llm.cancel": sys_cancel}
