"""The context window: a process's working memory, managed like RAM.

A process's prompt is composed from its system prompt, its core memory blocks (its own
and its program's), the running summary of what was moved out, and its conversation.
The kernel counts it in the model's own tokens. When a generation would overflow the
window, the process's policy applies:

- ``truncate``: the oldest turns leave the window (they stay in recall memory, where
  every message goes as it enters the context); the system prompt and the core memory
  blocks are pinned.
- ``summarize``: as truncate, but the model first folds the leaving turns into a running
  summary kept at the top of the prompt (MemGPT's scheme); the summary generation is
  charged to the process like any other.
- ``error``: the call fails with E2BIG, the context untouched.

Either way the process is told, in its prompt, how many messages were moved out and
that ``mem.recall.search`` finds them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from drivers.base import Driver, DriverError, Message
from kernel.persist import message_bytes
from syscalls import limits
from syscalls.errors import Errno, SyscallError

if TYPE_CHECKING:
    from kernel.kernel import Kernel
    from kernel.memory import Memory
    from kernel.process import Proc

#: Most tokens a running summary may take (the summary generation's max_tokens).
SUMMARY_TOKENS = 160
#: Of the window, the share a generation may claim for its output before older turns
#: are evicted to make room (it gets what is left, up to its max_tokens).
OUTPUT_SHARE = 4

SUMMARY_INSTRUCTIONS = (
    "You maintain the running summary of a conversation between a user and an assistant. "
    "Rewrite the summary so that it also covers the new messages below. Keep names, facts, "
    "numbers, decisions and open questions; be brief. Answer with the summary only."
)

Summarizer = Callable[[list[Message]], Awaitable[str]]


def window(proc: Proc, driver: Driver) -> int:
    """The process's context window in tokens (the model's, or smaller if asked)."""
    model = driver.info().max_context
    return model if proc.ctx_window is None else min(model, proc.ctx_window)


def core_memory(memory: Memory | None, proc: Proc) -> str:
    """The core memory blocks placed in ``proc``'s prompt (its own, then its program's)."""
    if memory is None:
        return ""
    parts = []
    for ns in dict.fromkeys((proc.namespace, proc.program.namespace)):
        for label, block in sorted(memory.blocks_of(ns).items()):
            parts.append(f'<block label="{label}">\n{block.value}\n</block>')
    if not parts:
        return ""
    return "Core memory (always in view; kept by the kernel):\n" + "\n".join(parts)


def _split(context: list[Message]) -> tuple[str | None, list[Message]]:
    if context and context[0]["role"] == "system":
        return context[0]["content"], context[1:]
    return None, context


def compose(
    proc: Proc,
    memory: Memory | None,
    rest: list[Message] | None = None,
    new: list[Message] | None = None,
    summary: str | None = None,
    evicted: int | None = None,
) -> list[Message]:
    """The chat the model sees for ``proc``: one system message (system prompt, core
    memory, summary or eviction note), then the conversation (``rest`` overrides the
    context's), then ``new`` turns."""
    base, convo = _split(proc.context)
    convo = convo if rest is None else rest
    summary = proc.summary if summary is None else summary
    evicted = proc.evicted if evicted is None else evicted
    extras = [x for x in (base, core_memory(memory, proc)) if x]
    if evicted:
        note = (
            f"{evicted} earlier messages of this conversation were moved out of the context window "
            "into recall memory (mem.recall.search finds them)."
        )
        extras.append(f"{note}\nSummary of them:\n{summary}" if summary else note)
    head = [{"role": "system", "content": "\n\n".join(extras)}] if extras else []
    return [*head, *convo, *(new or [])]


def _evictable(convo: list[Message], k: int) -> int:
    """Round ``k`` up so the kept conversation does not start with an assistant turn."""
    while k < len(convo) and convo[k]["role"] == "assistant":
        k += 1
    return k


async def fit(
    proc: Proc,
    memory: Memory | None,
    driver: Driver,
    new: list[Message],
    max_tokens: int,
    summarize: Summarizer,
) -> tuple[list[Message], int]:
    """The prompt for a chat generation of ``proc`` with ``new`` turns, made to fit its
    window by its policy; returns the prompt and its token count. Evicts from
    ``proc.context`` (and updates its summary) when it had to."""
    limit = window(proc, driver)
    reserve = min(max_tokens, limit // OUTPUT_SHARE)
    prompt = compose(proc, memory, new=new)
    n = await count_tokens(driver, prompt)
    if n + reserve <= limit or (proc.ctx_policy == "error" and n < limit):
        return prompt, n
    if proc.ctx_policy == "error":
        raise SyscallError(
            Errno.E2BIG,
            f"the prompt is {n} tokens but the window is {limit}; shorten it, "
            "clear the context (ctx.clear), or spawn with ctx_policy truncate or summarize",
        )
    base, convo = _split(proc.context)
    budget = limit - reserve - (SUMMARY_TOKENS if proc.ctx_policy == "summarize" else 0)

    async def size(k: int) -> int:
        kept = convo[_evictable(convo, k) :]
        return await count_tokens(
            driver, compose(proc, memory, rest=kept, new=new, evicted=proc.evicted + k)
        )

    if not convo or await size(len(convo)) > budget:
        raise SyscallError(
            Errno.E2BIG,
            f"the new messages do not fit {proc.pid}'s window of {limit} tokens even "
            "with the whole conversation moved out; send less at once",
        )
    lo, hi = 1, len(convo)  # the fewest oldest messages to evict so the rest fits
    while lo < hi:
        mid = (lo + hi) // 2
        if await size(mid) <= budget:
            hi = mid
        else:
            lo = mid + 1
    k = _evictable(convo, lo)
    leaving, kept = convo[:k], convo[k:]
    if proc.ctx_policy == "summarize":
        proc.summary = await summarize(_summary_prompt(proc.summary, leaving))
        if memory is not None:  # the summary itself is something the process has seen
            memory.record(
                proc, [{"role": "system", "content": f"Summary of earlier turns: {proc.summary}"}]
            )
    first = proc.context[0] if proc.context else None
    system = (
        first  # the same message object: its stored row stays (kernel/persist.py)
        if first is not None and first["role"] == "system" and first["content"] == base
        else {"role": "system", "content": base}
    )
    proc.context = ([system] if base is not None else []) + kept
    proc.evicted += k
    prompt = compose(proc, memory, new=new)
    return prompt, await count_tokens(driver, prompt)


def _summary_prompt(previous: str | None, leaving: list[Message]) -> list[Message]:
    transcript = "\n".join(f"{m['role']}: {m['content']}" for m in leaving)
    old = f"Current summary:\n{previous}\n\n" if previous else ""
    return [
        {"role": "system", "content": SUMMARY_INSTRUCTIONS},
        {"role": "user", "content": f"{old}New messages:\n{transcript}\n\nThe updated summary:"},
    ]


async def count_tokens(driver: Driver, prompt: list[Message] | str) -> int:
    try:
        return await driver.count_tokens(prompt)
    except DriverError as exc:
        raise SyscallError(Errno.EIO, str(exc)) from None


def check_room(k: Kernel, proc: Proc, turns: list[dict[str, Any]]) -> None:
    """E2BIG if ``turns`` would take ``proc``'s context past limits.MAX_CONTEXT_BYTES."""
    size = k.persist.context_bytes(proc) + sum(message_bytes(t) for t in turns)
    if size > limits.MAX_CONTEXT_BYTES:
        raise SyscallError(
            Errno.E2BIG,
            f"process {proc.pid}'s context would hold {size} bytes, over the bound of "
            f"{limits.MAX_CONTEXT_BYTES}; clear it or start from a snapshot",
        )
