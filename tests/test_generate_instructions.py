"""llm.generate's ``instructions``: a system message for one call, counted in its prompt,
never kept in the process's context (the gateway's per-response instructions and tool
guides on a session rely on it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from syscalls.errors import ERRORS, Errno
from tests.kernels import Daemon

EINVAL = ERRORS[Errno.EINVAL]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    k = Daemon(tmp_path_factory.mktemp("instr"), "--driver", "sim", "--slots", "1").start()
    yield k
    k.stop()


def test_instructions_count_in_the_prompt_but_stay_out_of_the_context(admin, spawn) -> None:
    a, b = spawn("plain"), spawn("instructed")
    turn = [{"role": "user", "content": "<sim:reply=2> hi"}]
    plain = a.generate(messages=turn, max_tokens=2)
    told = b.generate(
        messages=turn, max_tokens=2, instructions="Answer like a pirate, in three words."
    )
    assert told.usage.prompt_tokens > plain.usage.prompt_tokens  # it was in the prompt
    assert [m["role"] for m in b.context()] == ["user", "assistant"]  # and is not kept
    assert b.context()[0]["content"] == "<sim:reply=2> hi"
    with pytest.raises(EINVAL, match="instructions"):
        b.generate(prompt="raw text", instructions="no")
