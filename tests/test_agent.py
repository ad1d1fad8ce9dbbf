"""Tool calling by the model and the default agent loop, with the real model: the output
is constrained so a call always parses and matches its tool's schema."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import jsonschema
import pytest

from llmos.agent import Agent
from llmos.client import Client, Process
from syscalls.errors import ERRORS, Errno

pytestmark = pytest.mark.model

EINVAL, EPERM, ENOENT = (ERRORS[e] for e in (Errno.EINVAL, Errno.EPERM, Errno.ENOENT))
Spawn = Callable[..., Process]


def test_generate_with_tools_returns_a_call_that_matches_the_tools_schema(
    spawn: Spawn, admin: Client
) -> None:
    p = spawn("caller", system="Use tools for arithmetic.")
    schemas = {t.name: t.parameters for t in admin.tools()}
    for task in ("Compute 12 * 7 with the calculator.", "What time is it in Tokyo?", "Say hello."):
        res = p.generate(
            [{"role": "user", "content": task}],
            tools=["calculator", "datetime"],
            max_tokens=96,
            temperature=0.0,
        )
        assert (len(res.tool_calls) == 1) != (res.answer is not None), res.text
        for call in res.tool_calls:
            assert call.name in ("calculator", "datetime")
            jsonschema.validate(call.arguments, schemas[call.name])
        assert json.loads(res.text)  # the raw step is JSON too, and stays in the context
    assert p.context()[-1]["content"] == res.text


def test_the_model_can_call_the_memory_tools(spawn: Spawn, admin: Client) -> None:
    """The core/recall memory built-ins compile into the step's grammar (their schemas have
    patterns and bounds) and what the model chooses runs through tool.call."""
    names = ["memory_block_append", "memory_block_replace", "memory_recall_search"]
    p = spawn("rememberer", system="Keep lasting facts about the user in core memory.")
    schemas = {t.name: t.parameters for t in admin.tools()}
    res = p.generate(
        [{"role": "user", "content": "Remember this: my name is Ada."}],
        tools=names,
        max_tokens=64,
        temperature=0.0,
    )
    if res.finish_reason == "length":  # a small model may write on and on: still constrained
        starts = [f'{{"tool":"{n}","arguments":{{' for n in names] + ['{"answer":"']
        assert res.text.startswith(tuple(starts)), res.text
        return
    assert (len(res.tool_calls) == 1) != (res.answer is not None), res.text
    for call in res.tool_calls:
        assert call.name in names
        jsonschema.validate(call.arguments, schemas[call.name])
        try:
            p.tools.call(call.name, call.arguments)
        except ENOENT:  # a replace of text that is not there: the kernel answered
            assert call.name == "memory_block_replace"


def test_tools_in_generate_are_checked_like_tool_calls(spawn: Spawn) -> None:
    p = spawn("checked", tools=["calculator"])
    with pytest.raises(EPERM):
        p.generate([{"role": "user", "content": "hi"}], tools=["python"], max_tokens=8)
    with pytest.raises(ENOENT):
        p.generate([{"role": "user", "content": "hi"}], tools=["no_such_tool"], max_tokens=8)
    with pytest.raises(EINVAL, match="chat 'messages'"):
        p.generate(prompt="hi", tools=["calculator"], max_tokens=8)


def test_agent_loop_calls_the_calculator_with_valid_arguments_and_ends(spawn: Spawn) -> None:
    p = spawn("agent", system="You are a careful assistant. Use the calculator for arithmetic.")
    seen = []
    result = Agent(p, tools=["calculator"], max_steps=3, on_step=seen.append).run(
        "What is 1234 * 5678? Use the calculator."
    )
    assert result.stopped in ("answered", "max_steps") and len(result.steps) <= 3
    assert result.steps and result.steps == seen
    first = result.steps[0]
    assert first.tool == "calculator" and isinstance(first.arguments["expression"], str)
    # The tool ran (or refused a non-arithmetic expression with a sentence): either way
    # the kernel answered and the loop went on.
    assert first.result is not None or (first.error or "").startswith("EINVAL")
    ctx = p.context()
    assert any(m["role"] == "user" and m["content"].startswith("The tool calculator") for m in ctx)


def test_llmos_spawn_task_runs_the_agent_loop_from_the_command_line(daemon) -> None:
    env = {**__import__("os").environ, **daemon.env}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmos.ctl.cli",
            "spawn",
            "--task",
            "What is 6 * 7? Use the calculator.",
            "--tools",
            "calculator",
            "--max-steps",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert res.returncode in (0, 1), res.stderr
    report = json.loads(res.stdout)
    assert report["stopped"] in ("answered", "max_steps", "stuck")
    assert all(step["tool"] == "calculator" for step in report["steps"])
    assert (res.returncode == 0) == (report["answer"] is not None)
    pid = subprocess.run(
        [sys.executable, "-m", "llmos.ctl.cli", "spawn", "--name", "scripted"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert pid.returncode == 0 and pid.stdout.strip().isdigit()
