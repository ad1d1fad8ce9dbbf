"""One pydantic model per syscall's arguments and per result.

Every model forbids unknown fields and bounds every size, so the kernel can trust a
validated value. Field docs (``description``) feed the generated syscall table.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    SecretStr,
    field_validator,
    model_validator,
)

from syscalls import limits
from syscalls.limits import MIN_CTX_WINDOW

Name = Annotated[
    str,
    Field(min_length=1, max_length=limits.MAX_NAME_CHARS, pattern=r"^[A-Za-z0-9_.:@+-]+$"),
]
Text = Annotated[str, Field(max_length=limits.MAX_TEXT_CHARS)]
Pid = Annotated[int, Field(ge=1, lt=2**31)]
Nice = Annotated[int, Field(ge=limits.NICE_MIN, le=limits.NICE_MAX)]
Signal = Literal["TERM", "KILL", "STOP", "CONT"]
#: Signals a process can have died of: HUP means its program died while the kernel was down.
ExitSignal = Literal["HUP", "TERM", "KILL"]
#: A memory namespace: ``pid:N`` (a process's own), ``prog:N`` (a program's), or a name given
#: to a program at spawn (letters, digits, ``_.-``) that a later run can use again.
Namespace = Annotated[
    str,
    Field(
        min_length=1,
        max_length=limits.MAX_NAME_CHARS,
        pattern=r"^(pid:[0-9]+|prog:[0-9]+|[A-Za-z0-9_.-]+)$",
    ),
]
ProgramNamespace = Annotated[
    str,
    Field(min_length=1, max_length=limits.MAX_NAME_CHARS, pattern=r"^[A-Za-z0-9_.-]+$"),
]
Label = Annotated[
    str, Field(min_length=1, max_length=limits.MAX_NAME_CHARS, pattern=r"^[A-Za-z0-9_.-]+$")
]
CtxPolicy = Literal["truncate", "summarize", "error"]
#: A pub/sub topic: letters, digits and ``_.:/-`` (``jobs/done``, ``team.alerts``).
Topic = Annotated[
    str,
    Field(min_length=1, max_length=limits.MAX_TOPIC_CHARS, pattern=r"^[A-Za-z0-9_.:/-]+$"),
]


class ProcState(StrEnum):
    """A process's state, on the wire and in the kernel's process table (kernel/process.py
    uses this very class): NEW (never ran) -> READY (waits for a slot) -> RUNNING (on a
    slot) -> WAITING (idle: its program is thinking) ... STOPPED (SIGSTOP) ... ZOMBIE
    (exited, not reaped). A str, so a row's ``state == "READY"`` holds."""

    NEW = "NEW"
    READY = "READY"
    RUNNING = "RUNNING"
    WAITING = "WAITING"
    STOPPED = "STOPPED"
    ZOMBIE = "ZOMBIE"


#: Why a generation ended. The drivers' Delta.finish_reason (drivers/base.py) has the same
#: values; tests/test_models.py ties the two.
FinishReason = Literal["stop", "length", "abort"]
#: A detached generation's id (``llm.generate detach=true``): kernel-wide, never reused.
RunId = Annotated[int, Field(ge=1, lt=2**63)]


class RunState(StrEnum):
    """A detached generation's state: QUEUED (behind its process's other generations, or
    waiting for a slot) -> RUNNING (generating) -> DONE, FAILED or CANCELLED (finished;
    kept as a result until collected or expired)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Args(BaseModel):
    """Base of syscall arguments: strict types, unknown fields rejected."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Result(BaseModel):
    """Base of syscall results."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Empty(Args):
    """No arguments."""


class Done(Result):
    """No result beyond success."""


class ChatMessage(Args):
    """One turn of a conversation."""

    role: Literal["system", "user", "assistant"]
    content: Text


Messages = Annotated[list[ChatMessage], Field(max_length=limits.MAX_MESSAGES)]


# -- proc.* ------------------------------------------------------------------------


class Limits(Args):
    """Quotas; unset fields are inherited from the parent (or unlimited at top level)."""

    max_output_tokens: int | None = Field(
        default=None, ge=1, le=2**40, description="output tokens over its life"
    )
    max_context_tokens: int | None = Field(
        default=None, ge=1, le=2**31, description="prompt tokens of any one call"
    )
    max_wall_s: float | None = Field(
        default=None, gt=0, le=365 * 86400, description="seconds since spawn"
    )
    max_procs: int | None = Field(
        default=None,
        ge=1,
        le=1 << 20,
        description="processes, zombies included, its program may hold at once "
        "(default: a quarter of the process table)",
    )
    max_calls_per_min: int | None = Field(
        default=None, ge=1, le=10**6, description="llm.generate calls per minute"
    )
    max_ipc_bytes: int | None = Field(
        default=None,
        ge=1,
        le=1 << 40,
        description="bytes of its messages waiting in mailboxes at once (a program's; "
        "default: a quarter of the kernel's pool)",
    )
    max_topics: int | None = Field(
        default=None,
        ge=1,
        le=1 << 20,
        description="topics its processes subscribe to or it owns (a program's; default: a "
        "quarter of the topic table)",
    )
    max_parked: int | None = Field(
        default=None,
        ge=1,
        le=1 << 20,
        description="its tool calls waiting for the owner's confirmation (a program's; "
        "default: a quarter of the table)",
    )
    max_calls_in_flight: int | None = Field(
        default=None,
        ge=1,
        le=1 << 20,
        description="asynchronous syscalls in flight at once (a process's: default "
        f"{limits.MAX_CALLS_IN_FLIGHT_PER_PROCESS}; a program's: default a quarter of the "
        "kernel's bound)",
    )


_MAX_MOUNTS = limits.MAX_MOUNTS  # SpawnArgs has a field named limits
_MAX_TOOL_PATTERNS = limits.MAX_TOOL_PATTERNS
ToolName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")]
ToolPattern = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9_*?\[\]!-]+$")]
#: Kinds of personal data a process can have masked in what the kernel stores for it.
RedactKind = Literal["email", "phone", "card", "iban", "ip"]


class MountSpec(Args):
    """A directory given to a process at spawn, seen at ``/mnt/NAME``."""

    name: Label = Field(description="the mount's name: it appears at /mnt/NAME")
    path: Annotated[str, Field(min_length=1, max_length=limits.MAX_PATH_BYTES)] | None = Field(
        default=None,
        description="host directory (the admin only); a process passes on one of its own "
        "mounts by name, leaving this out",
    )
    mode: Literal["ro", "rw"] = Field(default="ro", description="read-only or read-write")


class SpawnArgs(Args):
    name: Name = Field(description="process name shown by ps")
    model: Name | None = Field(
        default=None, description="model to run on (default: the kernel's first)"
    )
    system: Text | None = Field(
        default=None, description="system prompt placed first in the context"
    )
    nice: Nice = Field(default=0, description="priority as a Unix nice value, -20 (first) .. 19")
    limits: Limits | None = Field(
        default=None, description="this process's quotas (never above its parent's)"
    )
    fork: bool = Field(
        default=False, description="start with a copy of the caller's context, like fork()"
    )
    adapter: Label | None = Field(
        default=None,
        description="a LoRA adapter of its model to generate with "
        "(llmos models lists them); inherited by children",
    )
    tools: list[ToolPattern] | None = Field(
        default=None,
        max_length=_MAX_TOOL_PATTERNS,
        description="tools it may use (glob patterns, e.g. "
        "['calculator', 'fs_*']); it can never use more than its parent (default: what the parent may)",
    )
    confirm: bool = Field(
        default=False,
        description="irreversible tool calls wait for the owner's approval "
        "(inherited; a child cannot turn it off)",
    )
    redact: list[RedactKind] | None = Field(
        default=None,
        max_length=5,
        description="personal data masked (<EMAIL>, <PHONE>, <CARD>, <IBAN>, <IP>) in what "
        "the kernel stores for it: context, recall, archival and core memory it writes, "
        "audit rows (inherited; a child can add kinds, never drop one)",
    )
    redact_model: bool = Field(
        default=False,
        description="also mask it in what the model is given (inherited)",
    )
    mounts: list[MountSpec] | None = Field(
        default=None,
        max_length=_MAX_MOUNTS,
        description="directories at /mnt/NAME (default: the "
        "parent's mounts); a child gets only mounts its parent has, never with more access",
    )
    namespace: ProgramNamespace | None = Field(
        default=None,
        description="name of the program's shared memory namespace (top-level spawns); "
        "a later program spawned with the same name finds that memory again",
    )
    ctx_policy: CtxPolicy = Field(
        default="truncate",
        description="when a prompt would overflow the window: drop the oldest turns "
        "(truncate), fold them into a running summary (summarize), or fail with E2BIG (error)",
    )
    ctx_window: int | None = Field(
        default=None,
        ge=MIN_CTX_WINDOW,
        le=2**24,
        description="context window in tokens, if smaller than the model's",
    )
    host_pid: int | None = Field(
        default=None,
        ge=1,
        lt=2**31,
        description="OS pid of the program driving the new process, on the "
        "kernel's host; if it is gone after a kernel restart the process is hung up (HUP)",
    )
    program_limits: Limits | None = Field(
        default=None, description="quotas of the whole program (top-level spawns only)"
    )
    claim: str | None = Field(
        default=None,
        min_length=16,
        max_length=64,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="an idempotency key of the caller's choosing: a spawn repeated with the "
        "same claim by the same caller (after a lost reply, a kernel restart) returns the "
        "process it made, with a new token (the old one stops working), not a second one",
    )


class SpawnResult(Result):
    pid: int
    token: str = Field(description="secret credential for acting as the new process")


class GetpidResult(Result):
    pid: int
    ppid: int


class Usage(Result):
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = Field(
        default=0,
        description="prompt tokens the driver reused from its prefix cache (all stretches)",
    )


class ProcInfo(Result):
    """One row of the process table."""

    pid: int
    ppid: int
    name: str
    owner: str
    state: ProcState
    nice: int
    model: str
    context_messages: int
    generate_calls: int
    prompt_tokens: int
    output_tokens: int
    service_s: float = Field(description="time spent generating on a slot")
    wait_s: float = Field(description="time spent READY, waiting for a slot")
    created: float = Field(description="spawn time, Unix seconds")
    exit_status: int | None = None
    signal: ExitSignal | None = Field(default=None, description="signal that ended it, if any")
    program: int = Field(
        default=0, description="pid of the program's first process (its program id)"
    )
    preemptions: int = Field(
        default=0, description="times the scheduler took its slot mid-generation"
    )
    switch_prefill_tokens: int = Field(
        default=0, description="tokens prefilled again to resume after preemptions"
    )
    switch_s: float = Field(default=0.0, description="time spent on those re-prefills")
    limits: dict[str, float] = Field(default_factory=dict, description="its quotas that are set")
    quota_exceeded: str | None = Field(
        default=None, description="the last quota it hit (process or program)"
    )
    mailbox: int = Field(default=0, description="messages waiting in its IPC mailbox")
    redact: list[str] = Field(
        default_factory=list, description="personal data kinds masked in what it stores"
    )
    wchan: str = Field(
        default="",
        description="what it is blocked in (as Unix's WCHAN): confirm:TOOL (a human's approval), "
        "llm, tool:NAME, tool.next, ipc.recv, ipc.send, wait, run.wait; empty if nothing",
    )


#: Most rows one proc.ps page or one sys.stat result carries.
MAX_PS_ROWS = 1000


class PsArgs(Args):
    pid: Pid | None = Field(default=None, description="only this process")
    after: int = Field(
        default=0, ge=0, lt=2**53, description="a page: processes with pids above this one"
    )
    limit: int = Field(
        default=MAX_PS_ROWS, ge=1, le=MAX_PS_ROWS, description="most rows in this page"
    )
    state: Literal["NEW", "READY", "RUNNING", "WAITING", "STOPPED", "ZOMBIE"] | None = Field(
        default=None, description="only processes in this state"
    )
    program: int | None = Field(
        default=None, ge=1, lt=2**53, description="only this program's processes"
    )


class PsResult(Result):
    procs: list[ProcInfo]
    next_after: int | None = Field(
        default=None, description="more rows follow: pass this as `after` for the next page"
    )


class WaitArgs(Args):
    pid: Pid | None = Field(default=None, description="child to wait for (default: any child)")
    timeout: float | None = Field(
        default=None,
        ge=0,
        le=limits.MAX_DEADLINE_MS / 1000,
        description="seconds to wait; 0 polls; default: until the call's deadline",
    )


class WaitResult(Result):
    pid: int
    exit_status: int
    signal: ExitSignal | None = None


class KillArgs(Args):
    pid: Pid
    signal: Signal = "TERM"


class KillResult(Result):
    pid: int
    state: ProcState


class ExitArgs(Args):
    status: int = Field(default=0, ge=0, le=255)


class NiceArgs(Args):
    pid: Pid | None = Field(default=None, description="target (default: the caller)")
    nice: Nice


class NiceResult(Result):
    pid: int
    nice: int


# -- llm.* -------------------------------------------------------------------------


class JsonSchemaFormat(Args):
    """Output is JSON valid under a JSON Schema (compact: no whitespace between tokens)."""

    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(
        alias="schema",
        description=f"the JSON Schema (at most {limits.MAX_SCHEMA_BYTES} bytes as "
        f"compact JSON, nested at most {limits.MAX_SCHEMA_DEPTH} deep)",
    )

    @field_validator("schema_")
    @classmethod
    def _bounded(cls, schema: dict[str, Any]) -> dict[str, Any]:
        if _deeper_than(schema, limits.MAX_SCHEMA_DEPTH):  # first: json.dumps recurses
            raise ValueError(f"the schema nests deeper than {limits.MAX_SCHEMA_DEPTH} levels")
        try:
            size = len(json.dumps(schema, allow_nan=False, separators=(",", ":")).encode())
        except (TypeError, ValueError) as exc:
            raise ValueError(f"the schema must be plain JSON ({exc})") from None
        if size > limits.MAX_SCHEMA_BYTES:
            raise ValueError(
                f"the schema is {size} bytes as JSON; the limit is {limits.MAX_SCHEMA_BYTES}"
            )
        return schema


def _deeper_than(value: object, limit: int) -> bool:
    """Whether JSON objects/arrays nest more than ``limit`` levels (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        )
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


class JsonObjectFormat(Args):
    """Output is any JSON object (compact)."""

    type: Literal["json_object"]


class ChoiceFormat(Args):
    """Output is exactly one of the choices."""

    type: Literal["choice"]
    choices: list[Annotated[str, Field(min_length=1, max_length=limits.MAX_CHOICE_CHARS)]] = Field(
        min_length=1, max_length=limits.MAX_CHOICES
    )


class RegexFormat(Args):
    """Output matches a regular expression in full (no lookaround, no backreferences)."""

    type: Literal["regex"]
    pattern: str = Field(min_length=1, max_length=limits.MAX_PATTERN_CHARS)


class GrammarFormat(Args):
    """Output is in the language of an EBNF grammar (xgrammar's dialect; start rule ``root``)."""

    type: Literal["grammar"]
    ebnf: str = Field(min_length=1, max_length=limits.MAX_GRAMMAR_CHARS)


#: Structured output: what the generated text must be.
ResponseFormat = Annotated[
    JsonSchemaFormat | JsonObjectFormat | ChoiceFormat | RegexFormat | GrammarFormat,
    Field(discriminator="type"),
]


class GenerateArgs(Args):
    messages: Messages | None = Field(
        default=None, description="chat turns appended to the process context, then answered"
    )
    prompt: Text | None = Field(
        default=None, description="raw text completion; the context is neither used nor changed"
    )
    temperature: float = Field(default=0.7, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(default=256, ge=1, le=limits.MAX_OUTPUT_TOKENS)
    stop: list[Annotated[str, Field(min_length=1, max_length=limits.MAX_STOP_CHARS)]] = Field(
        default_factory=list, max_length=limits.MAX_STOP_STRINGS
    )
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stream: bool = Field(default=False, description="send text chunks as they are generated")
    detach: bool = Field(
        default=False,
        description="return at once with a run id; the generation goes on in the kernel "
        "(llm.run, llm.stream, llm.wait), survives the client leaving and a kernel restart",
    )
    response_format: ResponseFormat | None = Field(
        default=None,
        description="constrain the output: a JSON Schema, any JSON object, one of fixed "
        "choices, a regex or an EBNF grammar (structured output)",
    )
    instructions: Text | None = Field(
        default=None,
        description="a system message for this call only: placed before the last message, "
        "counted in the prompt, never kept in the context (chat messages only)",
    )
    tools: list[ToolName] | None = Field(
        default=None,
        max_length=32,
        description="tools the model may call: the output is constrained to "
        "one call of one of them (valid arguments) or a final answer, returned parsed in tool_calls / answer "
        "(chat messages only; not with response_format)",
    )

    @model_validator(mode="after")
    def _one_input(self) -> GenerateArgs:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'messages' or 'prompt'")
        if self.instructions is not None and self.prompt is not None:
            raise ValueError("'instructions' work with chat 'messages', not a raw 'prompt'")
        if self.tools is not None and (self.prompt is not None or self.response_format is not None):
            raise ValueError(
                "tools work with chat 'messages' and without 'response_format' (they set it)"
            )
        if self.detach and self.stream:
            raise ValueError("a detached run streams with llm.stream, not 'stream'")
        return self


class GenerateChunk(Result):
    text: str


class ToolCall(Result):
    name: str
    arguments: dict[str, Any]


class CancelArgs(Args):
    pid: Pid | None = Field(
        default=None, description="whose generation to end: the caller or a descendant"
    )
    run: RunId | None = Field(
        default=None, description="end this detached run instead (its process goes on)"
    )

    @model_validator(mode="after")
    def _one_target(self) -> CancelArgs:
        if self.pid is not None and self.run is not None:
            raise ValueError("give 'pid' or 'run', not both")
        return self


class CancelResult(Result):
    pid: int
    cancelled: int = Field(description="generations ended (0: it was not generating)")


class GenerateResult(Result):
    text: str
    finish_reason: FinishReason | None = Field(
        description="why it ended; null only for a detached call (see run)"
    )
    usage: Usage
    tool_calls: list[ToolCall] = Field(
        default_factory=list, description="with tools: the call the model chose"
    )
    answer: str | None = Field(
        default=None, description="with tools: the model's final answer, if it gave one"
    )
    run: int | None = Field(
        default=None, description="detach=true: the run's id (the call returned at once)"
    )


class RunArgs(Args):
    run: RunId


class RunError(Result):
    code: str
    message: str


class RunInfo(Result):
    """A detached generation (llm.run, llm.runs)."""

    run: int
    pid: int
    state: RunState
    chat: bool = Field(description="chat messages (the turn is kept in the context when done)")
    chunks: int = Field(description="text chunks made so far (llm.stream from_seq counts these)")
    output_tokens: int
    usage: Usage | None = Field(default=None, description="when it finished")
    finish_reason: FinishReason | None = None
    error: RunError | None = Field(default=None, description="why it failed or was cancelled")
    created: float = Field(description="Unix seconds")
    started: float | None = Field(default=None, description="when it first got a slot")
    finished: float | None = None
    resumed: int = Field(default=0, description="times it went on after a kernel restart")


class RunsArgs(Args):
    pid: Pid | None = Field(default=None, description="only this process's runs")


class RunsResult(Result):
    runs: list[RunInfo]


class StreamArgs(Args):
    run: RunId
    from_seq: int = Field(
        default=0, ge=0, le=1 << 31, description="the first chunk wanted (0: from the start)"
    )


class RunChunk(Result):
    seq: int = Field(description="this chunk's number in the run")
    text: str


class WaitRunArgs(Args):
    run: RunId
    timeout: float | None = Field(
        default=None,
        ge=0,
        le=limits.MAX_DEADLINE_MS / 1000,
        description="seconds to wait; 0 polls; default: until the call's deadline "
        "(the run goes on either way)",
    )
    keep: bool = Field(default=False, description="leave the result to be read again")


# -- ctx.* -------------------------------------------------------------------------


class CtxGetArgs(Args):
    pid: Pid | None = Field(default=None, description="target (default: the caller)")
    last: int | None = Field(
        default=None, ge=0, le=limits.MAX_MESSAGES, description="only the last N"
    )


class CtxGetResult(Result):
    pid: int
    messages: list[ChatMessage]
    total: int = Field(description="messages in the whole context")
    summary: str | None = Field(
        default=None, description="running summary of turns moved out of the window"
    )
    evicted: int = Field(
        default=0, description="messages moved out of the window to recall memory so far"
    )


class CtxAppendArgs(Args):
    pid: Pid | None = None
    messages: Messages = Field(min_length=1)


class CtxClearArgs(Args):
    pid: Pid | None = None
    keep_system: bool = Field(default=True, description="keep the system prompt")


class CtxResult(Result):
    pid: int
    total: int


class CtxSnapshotArgs(Args):
    name: Label = Field(description="checkpoint name (saving again under a name replaces it)")
    pid: Pid | None = Field(default=None, description="target (default: the caller)")


class SnapshotInfo(Result):
    name: str
    messages: int
    created: float = Field(description="Unix seconds")


class CtxSnapshotsArgs(Args):
    pid: Pid | None = Field(default=None, description="target (default: the caller)")


class CtxSnapshotsResult(Result):
    pid: int
    snapshots: list[SnapshotInfo]


# -- mem.* -------------------------------------------------------------------------


class BlockGetArgs(Args):
    label: Label | None = Field(default=None, description="one block (default: all of them)")
    namespace: Namespace | None = Field(default=None, description="default: the caller's own")


class BlockSetArgs(Args):
    label: Label
    value: Annotated[str, Field(max_length=limits.MAX_BLOCK_CHARS)]
    max_chars: int | None = Field(
        default=None,
        ge=1,
        le=limits.MAX_BLOCK_CHARS,
        description=f"size limit (default: kept, or {limits.DEFAULT_BLOCK_CHARS} for a new block)",
    )
    namespace: Namespace | None = None


class BlockAppendArgs(Args):
    label: Label
    text: Annotated[str, Field(min_length=1, max_length=limits.MAX_BLOCK_CHARS)]
    namespace: Namespace | None = None


class BlockReplaceArgs(Args):
    label: Label
    old: Annotated[str, Field(min_length=1, max_length=limits.MAX_BLOCK_CHARS)]
    new: Annotated[str, Field(max_length=limits.MAX_BLOCK_CHARS)]
    namespace: Namespace | None = None


class BlockDeleteArgs(Args):
    label: Label
    namespace: Namespace | None = None


class Block(Result):
    namespace: str
    label: str
    value: str
    max_chars: int
    updated: float


class BlocksResult(Result):
    blocks: list[Block]


class RecallSearchArgs(Args):
    query: Annotated[str, Field(max_length=1000)] = Field(
        default="",
        description="words to look for (ranked by relevance); empty: the newest messages",
    )
    since: float | None = Field(
        default=None, description="only messages at or after this Unix time"
    )
    until: float | None = Field(default=None, description="only messages before this Unix time")
    role: Literal["system", "user", "assistant"] | None = None
    k: int = Field(default=10, ge=1, le=limits.MAX_SEARCH_K)
    namespace: Namespace | None = Field(
        default=None, description="whose recall (default: the caller's own)"
    )


class RecallHit(Result):
    id: int
    pid: int
    role: str
    content: str
    ts: float


class RecallSearchResult(Result):
    hits: list[RecallHit]


Scalar = str | int | float | bool


class Entry(Args):
    text: Annotated[str, Field(min_length=1, max_length=limits.MAX_ENTRY_CHARS)]
    metadata: dict[Label, Scalar] = Field(default_factory=dict, max_length=limits.MAX_META_KEYS)


class PutArgs(Args):
    entries: list[Entry] = Field(min_length=1, max_length=limits.MAX_PUT_ENTRIES)
    namespace: Namespace | None = None


class PutResult(Result):
    ids: list[int]
    embed_s: float = Field(description="time spent embedding the entries")


class IdsArgs(Args):
    ids: list[Annotated[int, Field(ge=1, lt=2**63)]] = Field(
        min_length=1, max_length=limits.MAX_PUT_ENTRIES
    )
    namespace: Namespace | None = None


class StoredEntry(Result):
    id: int
    namespace: str
    text: str
    metadata: dict[str, Scalar]
    created: float
    score: float | None = Field(default=None, description="cosine similarity to the query (search)")


class EntriesResult(Result):
    entries: list[StoredEntry]


class DeleteResult(Result):
    deleted: int


class SearchArgs(Args):
    query: Annotated[str, Field(min_length=1, max_length=limits.MAX_ENTRY_CHARS)]
    k: int = Field(default=5, ge=1, le=limits.MAX_SEARCH_K)
    filter: dict[Label, Scalar] = Field(
        default_factory=dict,
        max_length=limits.MAX_META_KEYS,
        description="metadata that must match exactly",
    )
    namespaces: list[Namespace] | None = Field(
        default=None, max_length=16, description="where to search (default: the caller's own)"
    )


class SearchResult(Result):
    hits: list[StoredEntry]
    embed_s: float = Field(description="time spent embedding the query")
    search_s: float = Field(description="time spent searching")


class GrantArgs(Args):
    namespace: Namespace = Field(description="a namespace the caller owns")
    pid: Pid = Field(description="the process that gets access")
    program: bool = Field(default=False, description="grant it to that process's whole program")
    write: bool = Field(default=False, description="read-write (default: read-only)")


class RevokeArgs(Args):
    namespace: Namespace
    pid: Pid
    program: bool = False


# -- ipc.* -------------------------------------------------------------------------


def body_bytes(value: object) -> int:
    """Size of a message body: its compact JSON in UTF-8 (what the mailbox bounds count).
    ValueError if it has no JSON form (NaN, infinity, unencodable text)."""
    return len(
        json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    )


def _shallow(value: object) -> object:
    # Checked before the recursive JSON validation, which would hit Python's recursion limit.
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limits.MAX_IPC_DEPTH:
                raise ValueError(f"nested deeper than {limits.MAX_IPC_DEPTH} levels")
            stack.extend(
                (v, depth + 1) for v in (item.values() if isinstance(item, dict) else item)
            )
    return value


def _small(value: JsonValue) -> JsonValue:
    try:
        size = body_bytes(value)
    except ValueError as exc:
        raise ValueError(f"has no JSON form ({exc})") from None
    if size > limits.MAX_IPC_MESSAGE_BYTES:
        raise ValueError(
            f"is {size} bytes as JSON, over the {limits.MAX_IPC_MESSAGE_BYTES}-byte limit of a message"
        )
    return value


#: A message body: any JSON value (text, number, list, object...), bounded in size and depth.
Body = Annotated[JsonValue, BeforeValidator(_shallow), AfterValidator(_small)]
#: A sender pid in a filter: 0 is the admin.
SenderPid = Annotated[int, Field(ge=0, lt=2**31)]


class SendArgs(Args):
    pid: Pid = Field(description="the receiving process (of the caller's program, for a process)")
    message: Body = Field(
        description=f"any JSON value, at most {limits.MAX_IPC_MESSAGE_BYTES} bytes as compact JSON"
    )
    timeout: float = Field(
        default=0.0,
        ge=0,
        le=limits.MAX_DEADLINE_MS / 1000,
        description="seconds to wait for room while the receiver's mailbox is full (bounded by the call's "
        "deadline); 0: EAGAIN at once",
    )


class SendResult(Result):
    id: int = Field(description="the message's id (kernel-wide, increasing)")
    pid: int = Field(description="the receiver")
    queued: int = Field(description="messages in the receiver's mailbox, this one included")


class RecvArgs(Args):
    timeout: float | None = Field(
        default=None,
        ge=0,
        le=limits.MAX_DEADLINE_MS / 1000,
        description="seconds to wait for a matching message; 0 polls; default: until the call's deadline",
    )
    from_pid: SenderPid | None = Field(
        default=None, description="only messages from this sender (0: the admin)"
    )
    topic: Topic | None = Field(default=None, description="only messages published on this topic")


class IpcMessage(Result):
    """One message as its receiver gets it."""

    id: int = Field(description="kernel-wide, increasing: a sender's messages arrive in id order")
    sender: int = Field(description="pid of the sender (0: the admin)")
    program: int = Field(description="the sender's program id (0: the admin)")
    topic: str | None = Field(
        default=None, description="the topic it was published on; None: sent directly"
    )
    sent: float = Field(description="when it was sent, Unix seconds")
    body: JsonValue


class RecvResult(Result):
    message: IpcMessage | None = Field(
        description="the oldest matching message; None: none arrived before the timeout"
    )
    pending: int = Field(description="messages left in the caller's mailbox")
    dropped: int = Field(
        description="published messages the caller missed because its mailbox was full"
    )


class TopicArgs(Args):
    topic: Topic


class SubscribeResult(Result):
    topic: str
    subscribers: int = Field(description="processes subscribed to the topic now")
    subscriptions: int = Field(description="topics the caller is subscribed to now")


class TopicCreateArgs(Args):
    topic: Topic
    allow: list[Pid] = Field(
        default_factory=list,
        max_length=64,
        description="other programs (their ids) whose processes may publish and subscribe",
    )
    others: Literal["none", "subscribe", "publish"] = Field(
        default="none",
        description="what every other program may do: nothing, subscribe (an announcement "
        "channel) or publish (an inbox)",
    )


class TopicCreateResult(Result):
    topic: str
    owner: int = Field(description="the program that owns it (0: the admin)")
    allow: list[int]
    others: str
    created: bool = Field(description="false: its owner changed the rules of an owned topic")
    subscribers: int


class TopicDeleteResult(Result):
    topic: str
    subscribers: int = Field(description="processes that were subscribed and lost it")


class PublishArgs(Args):
    topic: Topic
    message: Body = Field(
        description=f"any JSON value, at most {limits.MAX_IPC_MESSAGE_BYTES} bytes as compact JSON"
    )


class PublishResult(Result):
    id: int = Field(description="the message's id")
    delivered: int = Field(description="subscribers whose mailbox took a copy")
    dropped: int = Field(
        description="subscribers whose mailbox was full (their dropped counter went up)"
    )


# -- sys.* -------------------------------------------------------------------------


class ModelRow(Result):
    name: str
    driver: str
    max_context: int
    slots: int
    busy: int = Field(default=0, description="slots generating now")
    queued: int = Field(default=0, description="processes READY, waiting for a slot")
    state: str
    detail: str = ""
    default: bool = Field(default=False, description="processes that name no model run on this one")
    adapters: list[str] = Field(
        default_factory=list, description="LoRA adapters a process may pick at spawn"
    )
    wakes: int = Field(
        default=0, description="times woken after sleeping to make room for another model"
    )


class SysInfoResult(Result):
    version: str
    abi: int
    uptime_s: float
    kernel_pid: int
    endpoints: list[str]
    models: list[ModelRow]
    processes: int
    policy: str = Field(description="the scheduling policy")
    sandbox: str = Field(
        default="off",
        description="how the python tool runs code: bwrap (isolated), unsafe (no isolation, "
        "the operator's opt-in) or off (ENOTSUP)",
    )
    curve_server_key: str | None = Field(
        default=None,
        description="the kernel's CURVE public key (tcp:// endpoints), for clients to pin",
    )


class AuditArgs(Args):
    pid: Pid | None = Field(default=None, description="only rows by or about this process")
    program: Pid | None = Field(default=None, description="only this program's rows")
    since: float | None = Field(default=None, ge=0, description="only rows from this Unix time")
    limit: int = Field(default=100, ge=1, le=10_000, description="the newest N rows")
    verify: bool = Field(default=False, description="also check the whole hash chain")


class AuditRow(Result):
    seq: int
    ts: float
    actor: str = Field(description="admin, kernel or pid:N")
    program: int | None = None
    call: str
    target: str
    outcome: str = Field(description="ok or an error code")
    digest: str = Field(description="SHA-256 of the arguments (the arguments are not kept)")
    detail: str
    hash: str


class AuditVerdict(Result):
    ok: bool
    rows: int = Field(description="rows checked, archived segments included")
    first_broken: int | None = Field(default=None, description="seq of the first bad row")
    reason: str = ""


class AuditResult(Result):
    rows: list[AuditRow]
    verified: AuditVerdict | None = None


class StatArgs(Args):
    procs: bool = Field(default=True, description="include the caller-visible process rows")
    limit: int = Field(
        default=MAX_PS_ROWS,
        ge=0,
        le=MAX_PS_ROWS,
        description="most process rows: those on slots, then queued, stopped, new, "
        "waiting, exited (procs_total says how many there are)",
    )


class ModelStat(Result):
    """One model's share of the system state: its slots and run queue."""

    name: str
    driver: str
    slots: int
    busy: int = Field(description="slots generating now")
    queued: int = Field(description="processes READY, waiting for a slot")
    state: str
    memory_bytes: int | None = Field(
        default=None, description="model memory, where the driver knows it"
    )
    wakes: int = Field(
        default=0, description="times woken after sleeping to make room for another model"
    )
    sleeps: int = Field(default=0, description="times put to sleep to make room for another model")
    wake_s: float = Field(default=0.0, description="seconds spent waking, all wakes together")


class TokenStat(Result):
    """Token throughput of the whole kernel."""

    window_s: float = Field(description="the window the rates are averaged over")
    prompt_tps: float = Field(description="prompt tokens read per second")
    output_tps: float = Field(description="output tokens generated per second")
    prompt_total: int = Field(description="prompt tokens since the kernel started")
    output_total: int = Field(description="output tokens since the kernel started")
    cached_total: int = Field(
        default=0, description="prompt tokens reused from drivers' prefix caches since start"
    )


class HostStat(Result):
    """The machine and the kernel process."""

    cpus: int = Field(description="logical CPUs")
    cpu_percent: float = Field(
        description="system-wide CPU use since the previous sys.stat, 0..100"
    )
    load_avg: list[float] = Field(description="1, 5 and 15 minute load averages")
    mem_total: int = Field(description="bytes")
    mem_available: int = Field(description="bytes")
    kernel_rss: int = Field(description="resident bytes of the kernel process (models included)")
    kernel_cpu_s: float = Field(description="CPU seconds the kernel process has used")
    kernel_cpu_percent: float = Field(
        description="kernel process CPU since the previous sys.stat, 0..100*cpus"
    )


class StatResult(Result):
    """The system state vector: models (slots, queues), processes, token rates, host."""

    time: float = Field(description="when it was taken, Unix seconds")
    uptime_s: float
    policy: str = Field(description="the scheduling policy")
    models: list[ModelStat]
    states: dict[str, int] = Field(description="visible processes per state (every state present)")
    tokens: TokenStat
    host: HostStat
    procs: list[ProcInfo] = Field(description="the caller-visible process rows, as proc.ps")
    procs_total: int = Field(default=0, description="caller-visible processes in all")


# -- files (fs.*) -------------------------------------------------------------------------

FsPathArg = Annotated[
    str,
    Field(
        max_length=limits.MAX_PATH_BYTES,
        description="path in the process's view: "
        "its root, /home (the program's), /mnt/NAME (mounts)",
    ),
]


class FsReadArgs(Args):
    path: FsPathArg
    pid: Pid | None = Field(
        default=None,
        description="whose files: the caller's view by default; a descendant's, or anyone's "
        "for the admin",
    )
    offset: int = Field(default=0, ge=0, le=limits.MAX_FILE_BYTES)
    length: int | None = Field(
        default=None,
        ge=0,
        le=limits.MAX_IO_BYTES,
        description=f"bytes to read (default: up to {limits.MAX_IO_BYTES})",
    )


class FsReadResult(Result):
    path: str
    text: str | None = Field(default=None, description="the bytes read, when they are UTF-8 text")
    data: bytes | None = Field(default=None, description="the bytes read, when they are not text")
    size: int = Field(description="the whole file's size")
    version: int = Field(
        description="the file's latest version number (0: never written through llmos)"
    )


class FsWriteArgs(Args):
    path: FsPathArg
    text: Annotated[str, Field(max_length=limits.MAX_IO_BYTES)] | None = None
    data: Annotated[bytes, Field(max_length=limits.MAX_IO_BYTES)] | None = None
    parents: bool = Field(default=True, description="create missing directories")

    def payload(self) -> bytes:
        """The bytes to write: ``text`` as UTF-8, or ``data``."""
        if (self.text is None) == (self.data is None):
            from syscalls.errors import Errno, SyscallError

            raise SyscallError(Errno.EINVAL, "give exactly one of text (a string) or data (bytes)")
        return self.text.encode("utf-8") if self.text is not None else bytes(self.data or b"")


class FsWriteResult(Result):
    path: str
    size: int
    version: int = Field(description="the version this write made")


class FsPathArgs(Args):
    path: FsPathArg = "/"
    pid: Pid | None = Field(
        default=None,
        description="whose files: the caller's view by default; a descendant's, or anyone's "
        "for the admin",
    )


class FsEntry(Result):
    name: str
    type: Literal["file", "dir", "other"]
    size: int
    mtime: float


class FsListResult(Result):
    path: str
    entries: list[FsEntry]


class FsStatResult(Result):
    path: str
    type: Literal["file", "dir"]
    size: int
    mtime: float
    versions: int
    writable: bool


class FsMkdirArgs(Args):
    path: FsPathArg
    parents: bool = True


class FsRemoveArgs(Args):
    path: FsPathArg
    recursive: bool = False


class FsRemoveResult(Result):
    removed: int = Field(description="files removed (their contents stay in fs.history)")


class FsRenameArgs(Args):
    src: FsPathArg
    dst: FsPathArg


class FsHistoryArgs(Args):
    path: FsPathArg
    limit: int = Field(default=50, ge=1, le=limits.MAX_FS_VERSIONS)
    pid: Pid | None = Field(
        default=None,
        description="whose files: the caller's view by default; a descendant's, or anyone's "
        "for the admin",
    )


class FsVersion(Result):
    version: int
    sha256: str | None = Field(description="content hash; null for a removal")
    size: int
    time: float
    op: str = Field(
        description="write, append, remove, external, rollback to vN, renamed to/from PATH"
    )


class FsHistoryResult(Result):
    path: str
    versions: list[FsVersion]


class FsRollbackArgs(Args):
    path: FsPathArg
    version: int | None = Field(
        default=None, ge=1, le=2**62, description="the version to bring back"
    )
    time: float | None = Field(
        default=None,
        ge=0,
        le=2**40,
        allow_inf_nan=False,
        description="or: the content as it was at this Unix time",
    )


class FsSearchArgs(Args):
    query: Annotated[str, Field(min_length=1, max_length=limits.MAX_ENTRY_CHARS)]
    k: int = Field(default=5, ge=1, le=limits.MAX_SEARCH_K)


class FsHit(Result):
    path: str
    passage: int = Field(description="which passage of the file (0: its first ~1000 characters)")
    text: str
    score: float


class FsSearchResult(Result):
    hits: list[FsHit]


# -- tools (tool.*) ----------------------------------------------------------------------


class ToolInfo(Result):
    name: str
    description: str
    parameters: dict[str, Any] = Field(description="JSON schema of the arguments")
    irreversible: bool = Field(description="it changes the world in a way that cannot be undone")
    server: int | None = Field(
        default=None, description="pid of the process serving it; null: built in or MCP"
    )
    mcp: str | None = Field(default=None, description="the MCP server providing it, if one does")
    program: int | None = Field(
        default=None,
        description="the program whose processes it serves (its owner); null: every process "
        "(built in, MCP, or registered by the admin)",
    )


class ToolListResult(Result):
    tools: list[ToolInfo]


class ToolCallArgs(Args):
    name: ToolName
    args: dict[str, Any] = Field(
        default_factory=dict, description="arguments, checked against the tool's schema"
    )
    timeout_s: float = Field(
        default=30.0, gt=0, le=3600, description="give up after this long (ETIMEDOUT)"
    )


class ToolCallResult(Result):
    name: str
    result: Any = Field(description="the tool's JSON answer")
    elapsed_s: float


class ToolRegisterArgs(Args):
    name: ToolName
    description: Annotated[str, Field(min_length=1, max_length=2000)]
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object"}, description="JSON schema of the arguments"
    )
    irreversible: bool = False
    scope: Literal["program", "global"] | None = Field(
        default=None,
        description="who sees it: the server's program (a process's registration, the "
        "default) or every process (the admin only: its default)",
    )
    server: Pid | None = Field(
        default=None,
        description="the admin only: the process that serves it (receives its calls with "
        "tool.next)",
    )


class ToolNameArgs(Args):
    name: ToolName


class ToolNextArgs(Args):
    timeout_s: float = Field(default=10.0, ge=0, le=3600, description="wait this long for a call")


class ToolRequest(Result):
    id: int | None = Field(default=None, description="null: no call came within the timeout")
    name: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    caller: int | None = None


class ToolReplyArgs(Args):
    id: int = Field(ge=1)
    result: Any = None
    error: Annotated[str, Field(max_length=2000)] | None = Field(
        default=None, description="the call failed: why"
    )


class ParkedCall(Result):
    id: int
    name: str
    args: dict[str, Any]
    caller: int
    since: float


class ToolPendingResult(Result):
    calls: list[ParkedCall]


class ToolDecideArgs(Args):
    id: int = Field(ge=1)


# -- MCP servers mounted as tools (mcp.*) ----------------------------------------------

#: An MCP server's name: the prefix of its tools' names (``time`` -> ``time__get_current_time``).
McpName = Annotated[
    str, Field(min_length=1, max_length=24, pattern=r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
]


#: An environment variable's name (a stdio server's), as POSIX shells spell them.
McpEnvName = Annotated[
    str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
]
#: An HTTP header's name (RFC 9110 token characters).
McpHeaderName = Annotated[
    str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
]
#: A value given to a server (an API key, a token): a secret, never shown back.
McpSecret = Annotated[SecretStr, Field(max_length=limits.MAX_MCP_SECRET_CHARS)]
#: Headers the MCP transport sets itself (a server must not get them twice).
MCP_RESERVED_HEADERS = frozenset(
    {
        "accept",
        "connection",
        "content-length",
        "content-type",
        "host",
        "last-event-id",
        "mcp-protocol-version",
        "mcp-session-id",
        "te",
        "transfer-encoding",
        "upgrade",
    }
)


class McpAddArgs(Args):
    name: McpName
    target: Annotated[str, Field(min_length=1, max_length=limits.MAX_MCP_TARGET_CHARS)] = Field(
        description="a command line (stdio: the kernel runs it) or an http(s):// URL "
        "(streamable HTTP)"
    )
    timeout_s: float = Field(
        default=30.0, gt=0, le=600, description="wait this long for the server's tool list"
    )
    env: dict[McpEnvName, McpSecret] = Field(
        default_factory=dict,
        max_length=limits.MAX_MCP_ENV,
        description="stdio only: variables set over the server's clean environment "
        "(values are secrets: only the names are ever shown; no LLMOS_* names)",
    )
    headers: dict[McpHeaderName, McpSecret] = Field(
        default_factory=dict,
        max_length=limits.MAX_MCP_HEADERS,
        description="streamable HTTP only: headers sent with every request, e.g. "
        "Authorization (values are secrets: only the names are ever shown)",
    )

    @model_validator(mode="after")
    def _auth_fits_the_transport(self) -> McpAddArgs:
        http = self.target.startswith(("http://", "https://"))
        if self.env and http:
            raise ValueError(
                "env is for stdio servers (a command line); an http(s) URL takes headers"
            )
        if self.headers and not http:
            raise ValueError("headers are for http(s) servers; a stdio server takes env")
        for key, value in self.env.items():
            if key.upper().startswith("LLMOS_"):
                raise ValueError(f"env {key}: LLMOS_* variables are the kernel's own")
            if "\x00" in value.get_secret_value():
                raise ValueError(f"env {key}: its value holds a NUL character")
        seen: set[str] = set()
        for key, value in self.headers.items():
            low = key.lower()
            if low in MCP_RESERVED_HEADERS:
                raise ValueError(f"header {key} is set by the MCP transport itself")
            if low in seen:
                raise ValueError(f"header {key} is given twice")
            seen.add(low)
            if any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in value.get_secret_value()):
                raise ValueError(f"header {key}: its value holds a control character (CR, LF...)")
        return self


class McpNameArgs(Args):
    name: McpName


class McpServerInfo(Result):
    name: str
    target: str
    transport: Literal["stdio", "http"]
    state: Literal["starting", "ready", "restarting"] = Field(
        description="restarting: the connection ended; its tools answer EIO until it is back"
    )
    tools: list[str] = Field(description="the kernel tools it provides")
    refused: list[str] = Field(
        default_factory=list, description="tools it listed that were refused, each with why"
    )
    restarts: int = 0
    error: str | None = Field(default=None, description="why the last connection ended")
    env: list[str] = Field(
        default_factory=list, description="the names of the variables it was given (not values)"
    )
    headers: list[str] = Field(
        default_factory=list, description="the names of the headers it is sent (not values)"
    )


class McpListResult(Result):
    servers: list[McpServerInfo]
