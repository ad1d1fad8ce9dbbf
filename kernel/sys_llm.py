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
import logging
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
from kernel.process import SIGNAL_STATUS, Caller, Proc, ProcState
from kernel.quota import Account
from kernel.runs import Run, RunCall, RunTable
from kernel.syscall import Call
from kernel.toolcall import action_schema, parse_action, tool_guide
from syscalls import limits
from syscalls import models as m
from syscalls.errors import Errno, SyscallError

if TYPE_CHECKING:
    from kernel.kernel import Kernel

log = logging.getLogger("llmos.kernel")

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
    run: Run | None = None  # a detached run's generation: its chunks go to the run
    runs: RunTable | None = None

    def send_text(self, call: Call, text: str, final: bool = False) -> None:
        """Stream ``text``: the first piece at once, then batched every CHUNK_INTERVAL_S."""
        if text:
            self.unsent.append(text)
        now = time.monotonic()
        if self.unsent and (
            final or self.last_chunk is None or now - self.last_chunk >= CHUNK_INTERVAL_S
        ):
            if self.run is not None and self.runs is not None:  # with its resume point
                self.runs.add_chunk(self.run, "".join(self.unsent), self.out_ids)
            else:
                call.chunk({"text": "".join(self.unsent)})
            self.unsent.clear()
            self.last_chunk = now


async def sys_generate(k: Kernel, call: Call, a: m.GenerateArgs) -> m.GenerateResult:
    proc = call.caller.proc
    assert proc is not None
    if a.detach:
        return start_run(k, call, a)
    if proc.busy:
        raise SyscallError(
            Errno.EBUSY, f"process {proc.pid} is already generating; one call at a time"
        )
    return await _generate_held(k, call, proc, a)


async def _generate_held(k: Kernel, call: Call, proc: Proc, a: m.GenerateArgs) -> m.GenerateResult:
    """Generate as ``proc``, holding it busy (one generation at a time) until the end."""
    proc.busy = True
    try:
        return await _generate(k, call, proc, a)
    finally:
        proc.busy = False
        k.runs.kick(proc.pid)  # its next detached run may go
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
    stored = new  # what the context keeps of them: masked if the process redacts
    raw_prompt = a.prompt
    if proc.redact:
        stored = await k.redactor.mask_messages(new, proc.redact)
        if proc.redact_model:  # the model is given the masked words too
            new = stored
            if raw_prompt is not None:
                raw_prompt = (await k.redactor.mask([raw_prompt], proc.redact))[0]
    if stored:
        context.check_room(k, proc, stored)
    limit = context.window(proc, driver)
    run = call.run if isinstance(call, RunCall) else None
    if run is not None and run.prompt is not None:  # a run going on after a restart
        prompt, n_prompt = run.prompt, run.n_prompt
    elif a.prompt is None:
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
        prompt, n_prompt = raw_prompt, await context.count_tokens(driver, raw_prompt)
        if n_prompt >= limit:
            raise SyscallError(
                Errno.E2BIG,
                f"the prompt is {n_prompt} tokens but {proc.model}'s window is {limit}; shorten it",
            )
    fresh = run is None or run.prompt is None  # a resumed run has its prompt already
    if fresh and a.instructions is not None and isinstance(prompt, list):  # this call only
        prompt = _before_last(prompt, a.instructions)
        n_prompt += await context.count_tokens(driver, a.instructions)
        if n_prompt >= limit:
            raise SyscallError(
                Errno.E2BIG,
                f"the prompt with the instructions is {n_prompt} tokens; "
                f"{proc.model}'s window is {limit}: shorten them",
            )
    if fresh and tools:  # described to the model for this call only (not kept in the context)
        guide = tool_guide(tools)
        prompt = _before_last(prompt, guide) if isinstance(prompt, list) else prompt
        n_prompt += await context.count_tokens(driver, guide)
        if n_prompt >= limit:
            raise SyscallError(
                Errno.E2BIG,
                f"the prompt with the tools' descriptions is {n_prompt} tokens; "
                f"{proc.model}'s window is {limit}: offer fewer tools",
            )
    for acct in accounts:
        acct.check_context(n_prompt)
    if run is not None and run.prompt is None:  # journaled: a restart goes on with it
        kept = prompt
        if proc.redact and not proc.redact_model:  # the journal keeps no personal data
            kept = (
                await k.redactor.mask_messages(prompt, proc.redact)
                if isinstance(prompt, list)
                else (await k.redactor.mask([prompt], proc.redact))[0]
            )
        k.runs.started_with(run, kept, n_prompt)
    proc.generate_calls += 1
    sampling = dict(temperature=a.temperature, top_p=a.top_p, stop=tuple(a.stop), seed=a.seed)
    want = min(a.max_tokens, limit - n_prompt)
    gen, last = await complete(
        k,
        call,
        proc,
        driver,
        prompt,
        want,
        a.stream or run is not None,
        **sampling,
        response_format=fmt,
        run=run,
    )
    text = "".join(gen.parts)
    proc.prompt_tokens += last.prompt_tokens
    proc.mean_output = (
        last.output_tokens
        if proc.mean_output is None
        else ((1 - EWMA) * proc.mean_output + EWMA * last.output_tokens)
    )
    if a.messages is not None:
        reply = (await k.redactor.mask([text], proc.redact))[0] if proc.redact else text
        turns = [*stored, {"role": "assistant", "content": reply}]
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


def _before_last(prompt: list[dict[str, str]], note: str) -> list[dict[str, str]]:
    """``prompt`` with a system message ``note`` before its last message (for this call
    only: the context is composed again next time, without it)."""
    guide = {"role": "system", "content": note}
    return [*prompt[:-1], guide, prompt[-1]] if prompt else [guide]


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
    run: Run | None = None,
    **sampling: Any,
) -> tuple[Generation, Delta]:
    """Generate for ``proc`` with its quotas: reserve output tokens, run on slots (with
    preemption, STOP/CONT, wall limit), settle what was used. Returns the generation and
    its last delta. A detached ``run`` starts from its resume point (tokens journaled
    before a restart: charged now, generated again by no one)."""
    accounts = (proc.account, proc.program.account)
    grants = _reserve(accounts, want)
    gen = Generation(prompt, SamplingOptions(max_tokens=grants[-1], **sampling), stream)
    if run is not None:
        gen.run, gen.runs = run, k.runs
        uncharged = k.runs.attach(run, gen)
        for acct in accounts:
            acct.charge(uncharged)
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
        # Stable across turns and resumes: a router's affinity keeps the process's KV.
        session=f"llmos-{k.instance}-{proc.pid}",
        program=f"llmos-{k.instance}-prog{proc.program.pgid}",
        expected_tokens=max(expected - resumed, 1),
    )
    k.running[proc.pid] = rid
    if gen.run is not None:
        k.runs.on_slot(gen.run)
    started = time.monotonic()
    last: Delta | None = None
    first_cached = 0
    try:
        stream = driver.generate(request)
        try:
            async for delta in stream:
                if last is None:  # the driver has read the prompt (and any resumed tokens)
                    first_cached = delta.cached_tokens
                    k.stats.add_prompt(
                        delta.prompt_tokens + resumed - delta.cached_tokens, proc.model
                    )
                    k.stats.cached += delta.cached_tokens
                    gen.cached += delta.cached_tokens
                    if resumed:  # a context switch: what the driver had to compute again
                        proc.switch_prefill_tokens += (
                            delta.prompt_tokens + resumed - delta.cached_tokens
                        )
                        proc.switch_s += time.monotonic() - started
                k.stats.add_output(len(delta.token_ids), proc.model)
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
            late = last.cached_tokens - first_cached if last is not None else 0
            if late > 0:  # a driver that learns its cache hits at the end (openai: the usage)
                k.stats.cached += late
                gen.cached += late
                if resumed:
                    proc.switch_prefill_tokens = max(proc.switch_prefill_tokens - late, 0)
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


# -- detached runs (the mechanism: kernel/runs.py) ---------------------------------------


def start_run(k: Kernel, call: Call, a: m.GenerateArgs) -> m.GenerateResult:
    """llm.generate detach=true: make the run, queue it behind the process's other
    generations, and answer at once with its id."""
    proc = call.caller.proc
    assert proc is not None
    for name in dict.fromkeys(a.tools or ()):
        k.tools.lookup(proc, name)  # a tool it may not use fails the call, not the run later
    run = k.runs.create(call.caller, a)
    launch_run(k, run)
    return m.GenerateResult(text="", finish_reason=None, usage=m.Usage(), run=run.id)


def launch_run(k: Kernel, run: Run) -> None:
    """Start ``run``'s task: it acts as its process, tracked like the process's calls (a
    kill or llm.cancel of the process interrupts it)."""
    proc = k.procs.get(run.pid)
    if proc is None or not proc.alive:
        k.runs.finish(
            run,
            error=SyscallError(
                Errno.ECANCELED, f"process {run.pid} ended before run {run.id} could go on"
            ),
        )
        return
    loop = asyncio.get_running_loop()
    rcall = RunCall(run, Caller(proc.pid, proc), loop.time() + limits.MAX_RUN_S, k.runs)
    run.call = rcall
    k.runs.enqueue(run)
    rcall.task = loop.create_task(_drive(k, run, rcall, proc), name=f"run#{run.id}")
    rcall.task.add_done_callback(lambda _: _unstarted(k, run, rcall))
    k.track(rcall)


def _unstarted(k: Kernel, run: Run, rcall: RunCall) -> None:
    # A task cancelled before its first step (a kill in the same batch) never ran _drive.
    k.untrack(rcall)
    if not run.done and not k.runs.closing and run.call is rcall:
        k.runs.finish(
            run,
            error=rcall.interrupted
            or SyscallError(Errno.ECANCELED, f"run {run.id} was cancelled before it began"),
        )


async def _drive(k: Kernel, run: Run, rcall: RunCall, proc: Proc) -> None:
    """A run's life: its turn on the process, the generation, the outcome kept."""
    try:
        await k.runs.turn(run, lambda: proc.busy)
        async with asyncio.timeout_at(rcall.deadline):
            result = await _generate_held(k, rcall, proc, run.args)
    except asyncio.CancelledError:
        if k.runs.closing or rcall.interrupted is None:
            raise  # the kernel is stopping: the journal keeps the run for the next start
        k.runs.finish(run, error=rcall.interrupted)
    except TimeoutError:
        k.runs.finish(
            run,
            error=SyscallError(
                Errno.ETIMEDOUT, f"run {run.id} went on longer than {limits.MAX_RUN_S:.0f} s"
            ),
        )
    except SyscallError as err:
        k.runs.finish(run, error=err)
    except Exception:
        log.exception("internal error in run %d", run.id)
        k.runs.finish(
            run,
            error=SyscallError(Errno.EIO, f"internal kernel error in run {run.id}; see the log"),
        )
    else:
        k.runs.finish(run, result=result)
    finally:
        k.untrack(rcall)


def resume_runs(k: Kernel, runs: list[Run]) -> None:
    """At start: runs the journal had not seen finish go on from their last chunk."""
    for run in runs:
        launch_run(k, run)
        log.info(
            "run %d (process %d) goes on after a restart from %d journaled tokens",
            run.id,
            run.pid,
            len(run.ids),
        )


def sys_run(k: Kernel, call: Call, a: m.RunArgs) -> m.RunInfo:
    return k.runs.get(call.caller, a.run).info()


def sys_runs(k: Kernel, call: Call, a: m.RunsArgs) -> m.RunsResult:
    if a.pid is not None:
        k.procs.target(call.caller, a.pid)  # ESRCH / EPERM as for the process itself
    return m.RunsResult(runs=[r.info() for r in k.runs.visible(call.caller, a.pid)])


async def sys_stream(k: Kernel, call: Call, a: m.StreamArgs) -> m.GenerateResult:
    run = k.runs.get(call.caller, a.run)
    if a.from_seq > len(run.chunks) and run.done:
        raise SyscallError(
            Errno.EINVAL,
            f"run {run.id} has {len(run.chunks)} chunks; from_seq {a.from_seq} is past them",
        )
    call.seq = seq = a.from_seq  # the frames carry the run's own chunk numbers
    while True:
        while seq < len(run.chunks):
            call.chunk({"seq": seq, "text": run.chunks[seq]})
            seq += 1
        if run.done:
            return run.outcome()
        await run.changed()


async def sys_wait_run(k: Kernel, call: Call, a: m.WaitRunArgs) -> m.GenerateResult:
    run = k.runs.get(call.caller, a.run)
    if not run.done:
        loop = asyncio.get_running_loop()
        until = call.deadline if a.timeout is None else min(loop.time() + a.timeout, call.deadline)
        try:
            async with asyncio.timeout_at(until):
                while not run.done:
                    await run.changed()
        except TimeoutError:
            raise SyscallError(
                Errno.ETIMEDOUT, f"run {run.id} is still {run.state}; it goes on"
            ) from None
    if not a.keep:
        k.runs.collect(run)
    return run.outcome()


def sys_collect(k: Kernel, call: Call, a: m.RunArgs) -> m.Done:
    k.runs.collect(k.runs.get(call.caller, a.run))
    return m.Done()


def sys_cancel(k: Kernel, call: Call, a: m.CancelArgs) -> m.CancelResult:
    who = "the admin" if call.caller.admin else f"process {call.caller.pid}"
    if a.run is not None:
        run = k.runs.get(call.caller, a.run)
        if run.done or run.call is None:
            return m.CancelResult(pid=run.pid, cancelled=0)
        err = SyscallError(
            Errno.ECANCELED,
            f"run {run.id} of process {run.pid} was cancelled by {who} (llm.cancel); "
            "the process goes on",
        )
        if run.call.task is not None and run.call.interrupted is None:
            run.call.interrupt(err)
        return m.CancelResult(pid=run.pid, cancelled=1)
    proc = k.procs.target(call.caller, a.pid)
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


HANDLERS = {
    "llm.generate": sys_generate,
    "llm.cancel": sys_cancel,
    "llm.run": sys_run,
    "llm.runs": sys_runs,
    "llm.stream": sys_stream,
    "llm.wait": sys_wait_run,
    "llm.collect": sys_collect,
}
