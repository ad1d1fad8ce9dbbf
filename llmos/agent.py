"""The default agent loop: ReAct over the kernel's tools.

:meth:`Agent.run` asks the process's model for one step at a time with
``llm.generate(tools=[...])`` — the kernel constrains the output so it is always either
a call of one of the tools with arguments valid for it, or a final answer — runs the
chosen tool through ``tool.call``, shows the model what came back, and repeats until the
model answers or the step limit is reached. Every step goes through syscalls, so the
kernel's scheduling, quotas, capabilities and confirmations apply to it.

    from llmos import this_process
    from llmos.agent import Agent

    result = Agent(this_process(), tools=["calculator"]).run("What is 1234 * 5678?")
    print(result.answer, [s.tool for s in result.steps])
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from llmos.client import Process
from syscalls.errors import SyscallError

#: Characters of a tool's result shown to the model (the rest is cut, and it is told so).
MAX_OBSERVATION_CHARS = 2000


@dataclass
class Step:
    """One tool call the agent made, and what came of it."""

    tool: str
    arguments: dict[str, Any]
    result: Any = None
    error: str | None = None


@dataclass
class AgentResult:
    """How a run ended: ``answered`` (with ``answer``), ``max_steps`` or ``stuck`` (the
    model's output was cut short by its token limit)."""

    answer: str | None
    steps: list[Step] = field(default_factory=list)
    stopped: Literal["answered", "max_steps", "stuck"] = "answered"
    output_tokens: int = 0


class Agent:
    """A ReAct loop for ``process``.

    Args:
        process: the LLM process whose model thinks (its context keeps the whole run).
        tools: tool names it may call, or patterns (``time__*``) matched against the tools
            the process may use (default: every tool the process may use).
        max_steps: tool calls before the run is stopped.
        max_tokens: output tokens per step.
        temperature: sampling temperature (0: greedy).
        on_step: called with each :class:`Step` once its tool has answered.
    """

    def __init__(
        self,
        process: Process,
        tools: list[str] | None = None,
        max_steps: int = 6,
        max_tokens: int = 192,
        temperature: float = 0.0,
        on_step: Callable[[Step], None] | None = None,
    ) -> None:
        if max_steps < 1:
            raise ValueError("max_steps must be at least 1")
        self.process = process
        self.tools = _names(process, tools)
        if not self.tools:
            raise ValueError(
                "the agent has no tools to call; give tools=[...] or spawn with tool capabilities"
            )
        self.max_steps = max_steps
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.on_step = on_step

    def run(self, task: str) -> AgentResult:
        """Work on ``task`` until the model answers or ``max_steps`` tool calls are made."""
        result = AgentResult(answer=None)
        message = task
        for _ in range(self.max_steps + 1):
            res = self.process.generate(
                [{"role": "user", "content": message}],
                tools=self.tools,
                max_tokens=self.max_tokens,
                temperature=self.temperature,
            )
            result.output_tokens += res.usage.output_tokens
            if res.answer is not None:
                result.answer = res.answer
                return result
            if not res.tool_calls:
                result.stopped = "stuck"
                return result
            if len(result.steps) >= self.max_steps:
                break
            call = res.tool_calls[0]
            step = Step(call.name, call.arguments)
            try:
                step.result = self.process.tools.call(call.name, call.arguments)
            except SyscallError as exc:
                step.error = f"{exc.code}: {exc.message}"
            result.steps.append(step)
            if self.on_step is not None:
                self.on_step(step)
            message = _observation(step)
        result.stopped = "max_steps"
        return result


def _names(process: Process, tools: list[str] | None) -> list[str]:
    """Tool names for the loop: ``tools`` with each pattern (``*?[``) expanded against
    the tools ``process`` may use; all of those when ``tools`` is None."""
    if tools is not None and not any(set(t) & set("*?[") for t in tools):
        return tools
    visible = [t.name for t in process.tools.list()]
    if tools is None:
        return visible
    names: list[str] = []
    for pattern in tools:
        names += [n for n in visible if fnmatch.fnmatchcase(n, pattern) and n not in names]
    return names


def _observation(step: Step) -> str:
    """What the model is shown after a tool call."""
    if step.error is not None:
        return f"The tool {step.tool} failed: {step.error}. Try something else, or answer."
    text = json.dumps(step.result, ensure_ascii=False)
    if len(text) > MAX_OBSERVATION_CHARS:
        text = text[:MAX_OBSERVATION_CHARS] + " …(cut)"
    return f"The tool {step.tool} returned: {text}. Now answer, or call another tool."
