"""llm.generate: run a process's generation on a slot of its model.

The process is READY while it waits for a slot and RUNNING while it holds one. SIGSTOP
aborts the driver request at a token boundary and gives the slot back; the tokens made
so far are kept, and SIGCONT resumes from them (``resume_ids``), so the text is the same
as if it had never stopped. The context changes only when a generation completes:
a killed, timed-out or failed call leaves it as it was.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from drivers.base import Delta, DriverError, GenerationRequest, SamplingOptions
from kernel.process import SIGNAL_STATUS, Proc, ProcState
from kernel.syscall import Call
from syscalls import models as m
from syscalls.errors import Errno, SyscallError

if TYPE_CHECKING:
    from kernel.kernel import Kernel

_request_ids = itertools.count(1)


async def sys_generate(k: Kernel, call: Call, a: m.GenerateArgs) -> m.GenerateResult:
    proc = call.caller.proc
    assert proc is not None
    if proc.busy:
        raise SyscallError(Errno.EBUSY, f"process {proc.pid} is already generating; one call at a time")
    proc.busy = True
    try:
        return await _generate(k, call, proc, a)
    finally:
        proc.busy = False
        if proc.alive and proc.state in (ProcState.READY, ProcState.RUNNING, ProcState.NEW):
            proc.state = ProcState.WAITING
        if proc.alive and proc.term_pending:
            k.terminate(proc, SIGNAL_STATUS["TERM"], "TERM")


async def _generate(k: Kernel, call: Call, proc: Proc, a: m.GenerateArgs) -> m.GenerateResult:
    driver = await k.model_ready(proc.model)
    new = [msg.model_dump() for msg in a.messages] if a.messages is not None else []
    prompt: list[dict[str, str]] | str = [*proc.context, *new] if a.prompt is None else a.prompt
    window = driver.info().max_context
    try:
        n_prompt = await driver.count_tokens(prompt)
    except DriverError as exc:
        raise SyscallError(Errno.EIO, str(exc)) from None
    if n_prompt >= window:
        raise SyscallError(
            Errno.E2BIG, f"the prompt is {n_prompt} tokens but {proc.model}'s window is {window}; "
            "shorten it or clear the context (ctx.clear)")
    sampling = SamplingOptions(
        temperature=a.temperature, top_p=a.top_p, max_tokens=min(a.max_tokens, window - n_prompt),
        stop=tuple(a.stop), seed=a.seed)
    proc.generate_calls += 1
    out_ids: list[int] = []
    parts: list[str] = []
    while True:
        await proc.cont.wait()  # a STOPPED process holds no slot
        last = await _run_on_slot(k, call, proc, driver, prompt, sampling, out_ids, parts, a.stream)
        if last.finish_reason != "abort":
            break
        if proc.state is not ProcState.STOPPED:
            raise SyscallError(Errno.ECANCELED, f"the driver aborted process {proc.pid}'s generation")
    text = "".join(parts)
    proc.prompt_tokens += last.prompt_tokens
    proc.output_tokens += last.output_tokens
    if a.messages is not None:
        proc.context.extend(new)
        proc.context.append({"role": "assistant", "content": text})
    usage = m.Usage(prompt_tokens=last.prompt_tokens, output_tokens=last.output_tokens)
    return m.GenerateResult(text=text, finish_reason=last.finish_reason, usage=usage)


async def _run_on_slot(k, call, proc, driver, prompt, sampling, out_ids, parts, stream) -> Delta:
    """Hold a slot for one uninterrupted stretch of generation; return the last delta."""
    slot = await k.scheduler.acquire(proc)
    rid = f"{proc.pid}.{next(_request_ids)}"
    request = GenerationRequest(rid, prompt, sampling, priority=-proc.nice, resume_ids=list(out_ids))
    proc_request = k.running[proc.pid] = rid
    last: Delta | None = None
    try:
        stream_iter = driver.generate(request)
        try:
            prefilled = False
            async for delta in stream_iter:
                if not prefilled:  # the driver has read the prompt (and any resumed tokens)
                    k.stats.add_prompt(delta.prompt_tokens + len(request.resume_ids))
                    prefilled = True
                k.stats.add_output(len(delta.token_ids))
                out_ids.extend(delta.token_ids)
                if delta.text:
                    parts.append(delta.text)
                    if stream:
                        call.chunk({"text": delta.text})
                last = delta
        finally:
            await stream_iter.aclose()  # aborts the request if we are cancelled mid-stream
    except DriverError as exc:
        raise SyscallError(Errno.EIO, f"{proc.model}: {exc}") from None
    finally:
        if k.running.get(proc.pid) == proc_request:
            del k.running[proc.pid]
        k.scheduler.release(slot)
    if last is None or last.finish_reason is None:
        raise SyscallError(Errno.EIO, f"{proc.model}: the driver ended a generation without a finish reason")
    return last


HANDLERS = {"llm.generate": sys_generate}
