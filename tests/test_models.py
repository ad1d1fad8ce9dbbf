"""Every syscall's argument model rejects unknown fields, wrong types and oversized values;
the syscall table is complete and the docs are generated from it."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from kernel.kernel import HANDLERS
from syscalls import limits
from syscalls import models as m
from syscalls.table import SYSCALLS, markdown_table

DOCS = Path(__file__).resolve().parent.parent / "docs" / "SYSCALLS.md"


def test_every_syscall_has_exactly_one_kernel_handler():
    assert set(HANDLERS) == set(SYSCALLS)


@pytest.mark.parametrize("name", sorted(SYSCALLS))
def test_unknown_fields_are_rejected(name):
    with pytest.raises(ValidationError):
        SYSCALLS[name].args.model_validate({"surely_not_a_field": 1})


@pytest.mark.parametrize(
    "args",
    [
        {"name": ""},
        {"name": "x" * 65},
        {"name": "bad name"},
        {"name": "a/b"},
        {"name": 3},
        {"name": "ok", "nice": -21},
        {"name": "ok", "nice": 20},
        {"name": "ok", "nice": True},
        {"name": "ok", "system": "x" * (limits.MAX_TEXT_CHARS + 1)},
    ],
)
def test_spawn_args_are_bounded(args):
    with pytest.raises(ValidationError):
        m.SpawnArgs.model_validate(args)


@pytest.mark.parametrize(
    "args",
    [
        {},
        {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
        {"prompt": 5},
        {"prompt": "a", "max_tokens": 0},
        {"prompt": "a", "max_tokens": limits.MAX_OUTPUT_TOKENS + 1},
        {"prompt": "a", "temperature": -0.1},
        {"prompt": "a", "temperature": 2.5},
        {"prompt": "a", "top_p": 0},
        {"prompt": "a", "stop": ["x"] * 9},
        {"prompt": "a", "stop": [""]},
        {"prompt": "a", "stop": ["x" * 65]},
        {"prompt": "a", "seed": -1},
        {"prompt": "a", "stream": "yes"},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "user", "content": "x", "name": "extra"}]},
        {"messages": [{"role": "user", "content": "x"}] * (limits.MAX_MESSAGES + 1)},
        {"prompt": "x" * (limits.MAX_TEXT_CHARS + 1)},
    ],
)
def test_generate_args_are_validated(args):
    with pytest.raises(ValidationError):
        m.GenerateArgs.model_validate(args)


@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "json_schema"},
        {"type": "json_schema", "schema": "{}"},
        {"type": "json"},
        {"type": "json_schema", "schema": {"enum": ["x" * 1000] * 40}},
        {"type": "json_schema", "schema": {"a": b"bytes"}},
        {"type": "json_schema", "schema": {"a": float("nan")}},
        {"type": "choice", "choices": []},
        {"type": "choice", "choices": [""]},
        {"type": "choice", "choices": ["a"] * (limits.MAX_CHOICES + 1)},
        {"type": "regex", "pattern": ""},
        {"type": "regex", "pattern": "a" * (limits.MAX_PATTERN_CHARS + 1)},
        {"type": "grammar", "ebnf": "x" * (limits.MAX_GRAMMAR_CHARS + 1)},
        {"type": "json_object", "schema": {}},
    ],
)
def test_generate_response_formats_are_bounded(fmt):
    with pytest.raises(ValidationError):
        m.GenerateArgs.model_validate({"prompt": "a", "response_format": fmt})


def test_a_schema_nested_too_deep_is_refused_without_recursing():
    schema: dict = {}
    for _ in range(5000):
        schema = {"items": schema}
    with pytest.raises(ValidationError, match="nests deeper"):
        m.GenerateArgs.model_validate(
            {"prompt": "a", "response_format": {"type": "json_schema", "schema": schema}}
        )


def test_generate_takes_each_response_format_form():
    forms = [
        {"type": "json_schema", "schema": {"type": "object"}},
        {"type": "json_object"},
        {"type": "choice", "choices": ["a", "b"]},
        {"type": "regex", "pattern": "[0-9]+"},
        {"type": "grammar", "ebnf": 'root ::= "x"'},
    ]
    for form in forms:
        a = m.GenerateArgs.model_validate({"prompt": "a", "response_format": form})
        assert a.response_format is not None and a.response_format.model_dump(by_alias=True) == form


def test_generate_accepts_ints_for_floats_and_fills_defaults():
    a = m.GenerateArgs.model_validate({"prompt": "hi", "temperature": 0})
    assert a.temperature == 0.0 and a.max_tokens == 256 and a.stop == [] and not a.stream


@pytest.mark.parametrize(
    "model,args",
    [
        (m.KillArgs, {"pid": 2, "signal": "HUP"}),
        (m.KillArgs, {"pid": 0}),
        (m.KillArgs, {}),
        (m.WaitArgs, {"timeout": -1}),
        (m.ExitArgs, {"status": 256}),
        (m.ExitArgs, {"status": -1}),
        (m.NiceArgs, {"nice": 99}),
        (m.CtxGetArgs, {"last": -1}),
        (m.CtxAppendArgs, {"messages": []}),
        (m.PsArgs, {"pid": "1"}),
    ],
)
def test_other_syscall_args_are_validated(model, args):
    with pytest.raises(ValidationError):
        model.model_validate(args)


def test_docs_syscall_table_is_generated_from_the_models():
    assert (
        DOCS.read_text()
        == "# Syscall table\n\nGenerated by `llmos syscalls --markdown`; do not edit.\n\n"
        + markdown_table()
    )


def test_the_sdk_turns_a_pydantic_model_class_into_a_json_schema_format():
    from pydantic import BaseModel

    from llmos.client import response_format

    class City(BaseModel):
        name: str

    assert response_format(City) == {"type": "json_schema", "schema": City.model_json_schema()}
    assert response_format({"type": "json_object"}) == {"type": "json_object"}
    assert response_format(m.ChoiceFormat(type="choice", choices=["a"])) == {
        "type": "choice",
        "choices": ["a"],
    }
    with pytest.raises(TypeError, match="pydantic model class"):
        response_format("json")


def test_process_states_and_finish_reasons_have_one_meaning_everywhere():
    """The contract (syscalls/) defines the process states the kernel uses; the drivers'
    finish reasons, defined apart (drivers/base.py), must be the wire's."""
    import typing

    from drivers.base import FinishReason as DriverFinishReason
    from kernel.process import ProcState

    assert ProcState is m.ProcState
    assert [s.value for s in ProcState] == [
        "NEW",
        "READY",
        "RUNNING",
        "WAITING",
        "STOPPED",
        "ZOMBIE",
    ]
    assert m.ProcInfo.model_fields["state"].annotation is ProcState
    assert m.KillResult(pid=2, state="READY").state == "READY"  # the wire's strings validate
    with pytest.raises(ValidationError):
        m.KillResult(pid=2, state="SLEEPING")
    assert typing.get_args(DriverFinishReason) == typing.get_args(m.FinishReason)
    for model in (m.GenerateResult, m.RunInfo):  # null only for a run not finished
        ann = model.model_fields["finish_reason"].annotation
        assert set(typing.get_args(ann)) == {m.FinishReason, type(None)}
    assert [s.value for s in m.RunState] == ["queued", "running", "done", "failed", "cancelled"]
    assert m.RunInfo.model_fields["state"].annotation is m.RunState


def test_run_arguments_refuse_what_cannot_mean_anything() -> None:
    with pytest.raises(ValidationError, match="llm.stream"):
        m.GenerateArgs(prompt="x", detach=True, stream=True)
    with pytest.raises(ValidationError, match="not both"):
        m.CancelArgs(pid=2, run=1)
    for bad in ({"run": 0}, {"run": 1, "from_seq": -1}, {"run": "1"}):
        with pytest.raises(ValidationError):
            m.StreamArgs.model_validate(bad)
    assert m.WaitRunArgs(run=3).keep is False
