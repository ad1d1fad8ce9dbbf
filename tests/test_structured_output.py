"""Structured output (``response_format``) with the real packaged SmolLM2 (no mocks).

Driver tests run the CPU driver directly (one driver for the module); end-to-end tests
run the session's real kernel daemon through the SDK. Assertions are about form (the
text parses, validates, matches), determinism and errors, never about content.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pydantic import BaseModel, Field

from drivers.base import (
    Delta,
    FormatError,
    GenerationRequest,
    Message,
    ResponseFormat,
    SamplingOptions,
    UnsupportedError,
)
from drivers.cpu import CpuDriver
from drivers.grammar import schema_text
from drivers.sim import SimDriver
from llmos.client import Client, Process
from syscalls import errors, limits
from tests.conftest import GREEDY
from tests.kernels import Daemon

pytestmark = pytest.mark.model

T = TypeVar("T")
PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
    },
    "required": ["name", "age", "colour"],
}
PERSON = ResponseFormat("json_schema", schema_text(PERSON_SCHEMA))
ASK_PERSON: list[Message] = [
    {"role": "user", "content": "Describe a person as JSON: name, age, favourite colour, tags."}
]
CHAT: list[Message] = [{"role": "user", "content": "Write a short poem about the sea."}]
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
YES_NO_GRAMMAR = 'root ::= "Answer: " ("yes" | "no") "."'


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)


def _nested(depth: int) -> dict[str, Any]:
    """A schema whose objects nest ``depth`` levels deep."""
    schema: dict[str, Any] = {}
    for _ in range(depth - 1):
        schema = {"items": schema}
    return schema


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def validate(instance: Any, schema: dict[str, Any]) -> None:
    """Check ``instance`` against ``schema`` with jsonschema (installed with vLLM)."""
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(instance, schema)


_ids = iter(range(1_000_000))


def request(
    prompt: list[Message] | str,
    fmt: ResponseFormat | None,
    resume: list[int] | None = None,
    **sampling: Any,
) -> GenerationRequest:
    options = SamplingOptions(
        **{"temperature": 0, "max_tokens": 64, **sampling, "response_format": fmt}
    )
    return GenerationRequest(f"so-{next(_ids)}", prompt, options, resume_ids=list(resume or []))


async def collect(driver: CpuDriver, req: GenerationRequest) -> list[Delta]:
    return [delta async for delta in driver.generate(req)]


def generate(
    driver: CpuDriver, prompt: list[Message] | str, fmt: ResponseFormat | None, **sampling: Any
) -> tuple[str, list[int], Delta]:
    deltas = run(collect(driver, request(prompt, fmt, **sampling)))
    return "".join(d.text for d in deltas), [i for d in deltas for i in d.token_ids], deltas[-1]


@pytest.fixture(scope="module")
def driver() -> Iterator[CpuDriver]:
    drv = CpuDriver(slots=4)
    run(drv.load())
    yield drv
    run(drv.shutdown())


# ------------------------------------------------------------------ the CPU driver


def test_json_schema_output_parses_and_validates(driver: CpuDriver) -> None:
    text, _, last = generate(driver, ASK_PERSON, PERSON)
    assert last.finish_reason == "stop", text
    validate(json.loads(text), PERSON_SCHEMA)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_sampled_json_schema_output_always_validates(driver: CpuDriver, seed: int) -> None:
    text, _, last = generate(
        driver, ASK_PERSON, PERSON, temperature=1.0, top_p=0.95, seed=seed, max_tokens=96
    )
    assert last.finish_reason == "stop", text
    validate(json.loads(text), PERSON_SCHEMA)


def test_json_object_output_is_a_json_object(driver: CpuDriver) -> None:
    prompt = [
        {"role": "user", "content": "Give a JSON object with keys city and country for Paris."}
    ]
    text, _, last = generate(driver, prompt, ResponseFormat("json_object"), max_tokens=48)
    assert last.finish_reason == "stop", text
    assert isinstance(json.loads(text), dict)


def test_choice_output_is_one_of_the_choices(driver: CpuDriver) -> None:
    choices = ("yes", "no", "it depends")
    for seed in (1, 2):
        prompt = [{"role": "user", "content": "Is the sea blue?"}]
        text, _, last = generate(
            driver, prompt, ResponseFormat("choice", choices=choices), temperature=1.0, seed=seed
        )
        assert text in choices and last.finish_reason == "stop"


def test_regex_output_matches_in_full(driver: CpuDriver) -> None:
    prompt = [{"role": "user", "content": "Give me a US phone number."}]
    text, _, last = generate(driver, prompt, ResponseFormat("regex", PHONE))
    assert re.fullmatch(PHONE, text) and last.finish_reason == "stop", text


def test_ebnf_grammar_output_is_in_its_language(driver: CpuDriver) -> None:
    text, _, _ = generate(
        driver,
        [{"role": "user", "content": "Is fire hot?"}],
        ResponseFormat("grammar", YES_NO_GRAMMAR),
    )
    assert text in ("Answer: yes.", "Answer: no.")


def test_max_tokens_cuts_a_constrained_output_with_length(driver: CpuDriver) -> None:
    text, ids, last = generate(driver, ASK_PERSON, PERSON, max_tokens=5)
    assert last.finish_reason == "length" and len(ids) == 5
    assert text.startswith("{")


def test_constrained_and_free_sequences_batched_together_match_their_solo_runs(
    driver: CpuDriver,
) -> None:
    jobs: list[tuple[list[Message] | str, ResponseFormat | None]] = [
        (CHAT, None),
        (ASK_PERSON, PERSON),
        (
            [{"role": "user", "content": "Give me a US phone number."}],
            ResponseFormat("regex", PHONE),
        ),
        ("Once upon a time", None),
    ]
    solo = [generate(driver, p, f, max_tokens=24) for p, f in jobs]

    async def together() -> list[list[Delta]]:
        return await asyncio.gather(
            *(collect(driver, request(p, f, max_tokens=24)) for p, f in jobs)
        )

    joint = run(together())
    for (text, ids, _), deltas in zip(solo, joint, strict=True):
        assert "".join(d.text for d in deltas) == text
        assert [i for d in deltas for i in d.token_ids] == ids
    assert re.fullmatch(PHONE, solo[2][0])
    assert solo[0][0] != solo[1][0]


@pytest.mark.parametrize("cut", [1, 4, 9])
def test_a_resumed_constrained_generation_continues_exactly(driver: CpuDriver, cut: int) -> None:
    full_text, full_ids, full_last = generate(driver, ASK_PERSON, PERSON)
    assert len(full_ids) > cut
    first_text, first_ids, _ = generate(driver, ASK_PERSON, PERSON, max_tokens=cut)
    deltas = run(collect(driver, request(ASK_PERSON, PERSON, resume=first_ids)))
    assert first_text + "".join(d.text for d in deltas) == full_text
    assert first_ids + [i for d in deltas for i in d.token_ids] == full_ids
    assert (deltas[-1].finish_reason, deltas[-1].output_tokens) == ("stop", full_last.output_tokens)


def test_a_format_is_compiled_once_then_cached(driver: CpuDriver) -> None:
    fmt = ResponseFormat("regex", r"[a-z]{2,5}")
    before = driver.grammar_compiles()
    run(driver.prepare_format(fmt))
    generate(driver, CHAT, fmt, max_tokens=6)
    generate(driver, CHAT, ResponseFormat("regex", r"[a-z]{2,5}"), max_tokens=6)
    assert driver.grammar_compiles() == before + 1


@pytest.mark.parametrize(
    "fmt,says",
    [
        (ResponseFormat("regex", "(unclosed"), "parenthesis is not closed"),
        (ResponseFormat("regex", "(?=x)y"), "Lookahead is not supported"),
        (ResponseFormat("json_schema", '{"type": "nonsense"}'), "Unsupported type"),
        (ResponseFormat("json_schema", '{"$ref": "#/$defs/missing"}'), "missing"),
        (ResponseFormat("grammar", 'root ::= "a" |'), "EBNF parser error"),
        (ResponseFormat("grammar", 'start ::= "a"'), 'root rule with name "root" is not found'),
    ],
)
def test_an_invalid_format_is_refused_with_a_reason(
    driver: CpuDriver, fmt: ResponseFormat, says: str
) -> None:
    with pytest.raises(FormatError, match=re.escape(says)):
        run(driver.prepare_format(fmt))
    with pytest.raises(FormatError, match=re.escape(says)):
        generate(driver, CHAT, fmt)
    assert driver.live_request_ids() == frozenset()


def test_the_simulated_driver_refuses_a_response_format() -> None:
    sim = SimDriver()
    run(sim.load())
    with pytest.raises(UnsupportedError, match="cannot constrain"):
        run(sim.prepare_format(ResponseFormat("json_object")))

    async def attempt() -> None:
        async for _ in sim.generate(request("hi", ResponseFormat("json_object"))):
            pass

    with pytest.raises(UnsupportedError, match="cannot constrain"):
        run(attempt())


# ------------------------------------------------------------------ through the kernel


def test_sdk_takes_a_pydantic_model_and_the_text_parses(spawn) -> None:
    p: Process = spawn()
    res = p.generate(
        [{"role": "user", "content": "Make up a person."}],
        response_format=Person,
        max_tokens=64,
        temperature=0.8,
        seed=5,
    )
    assert res.finish_reason == "stop"
    person = Person.model_validate_json(res.text)
    assert person.age >= 0
    assert p.context()[-1] == {"role": "assistant", "content": res.text}  # kept as generated


def test_sdk_dict_forms_work_for_schema_choice_regex_and_stream(spawn) -> None:
    p: Process = spawn()
    res = p.generate(
        prompt="A person:",
        response_format={"type": "json_schema", "schema": PERSON_SCHEMA},
        **GREEDY,
    )
    validate(json.loads(res.text), PERSON_SCHEMA)
    answer = p.chat(
        "Pick one.", response_format={"type": "choice", "choices": ["left", "right"]}, **GREEDY
    )
    assert answer in ("left", "right")
    pieces = list(
        p.stream("A phone number?", response_format={"type": "regex", "pattern": PHONE}, **GREEDY)
    )
    assert (
        re.fullmatch(PHONE, "".join(pieces))
        and p.last is not None
        and p.last.text == "".join(pieces)
    )


@pytest.mark.parametrize(
    "fmt,says",
    [
        ({"type": "regex", "pattern": "(unclosed"}, "regular expression"),
        ({"type": "json_schema", "schema": {"type": "nonsense"}}, "Unsupported type"),
        ({"type": "grammar", "ebnf": "root ::= "}, "EBNF grammar"),
    ],
)
def test_an_invalid_format_is_einval_with_a_sentence(
    spawn, admin: Client, fmt: dict[str, Any], says: str
) -> None:
    p: Process = spawn()
    with pytest.raises(errors.EINVAL) as exc:
        p.generate(prompt="x", response_format=fmt, max_tokens=4)
    assert "response_format" in exc.value.message and says in exc.value.message
    assert p.context() == [] and admin.info().models[0].busy == 0


@pytest.mark.parametrize(
    "fmt,says",
    [
        ({"type": "json_schema", "schema": {"enum": ["x" * 100] * 400}}, "bytes as JSON"),
        ({"type": "choice", "choices": ["a"] * (limits.MAX_CHOICES + 1)}, "at most"),
        ({"type": "regex", "pattern": "a" * (limits.MAX_PATTERN_CHARS + 1)}, "at most"),
        ({"type": "json_schema", "schema": _nested(limits.MAX_SCHEMA_DEPTH + 1)}, "deeper"),
        ({"type": "xml"}, "does not match any of the expected tags"),
    ],
)
def test_an_oversized_or_unknown_format_is_einval(spawn, fmt: dict[str, Any], says: str) -> None:
    with pytest.raises(errors.EINVAL) as exc:
        spawn().generate(prompt="x", response_format=fmt, max_tokens=4)
    assert says in exc.value.message


def test_a_driver_without_structured_output_answers_enotsup(tmp_path: Path) -> None:
    with Daemon(tmp_path, "--driver", "sim", "--slots", "1") as k, k.admin() as admin:
        p = admin.spawn("t")
        with pytest.raises(errors.ENOTSUP) as exc:
            p.generate(prompt="x", response_format={"type": "json_object"}, max_tokens=4)
        assert "cannot constrain" in exc.value.message
        assert p.generate(prompt="x", max_tokens=2).usage.output_tokens == 2
