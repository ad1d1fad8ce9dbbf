"""The CPU driver against the real packaged SmolLM2-135M-Instruct (no mocks).

The driver is loaded once for the module; the first run ever also exports the packaged
GGUF to the llmos cache (about 30 s). Outputs are kept short (max_tokens <= 16) and the
assertions are about structure, limits, determinism and scheduling, not answer quality.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from drivers import DRIVERS, make_driver, packaged
from drivers.base import Delta, DriverError, GenerationRequest, Message, SamplingOptions
from drivers.cpu import CpuDriver, _Detokenizer, _StopText

pytestmark = pytest.mark.model

T = TypeVar("T")
CHAT: list[Message] = [{"role": "user", "content": "Write a short poem about the sea."}]
GREEDY = SamplingOptions(temperature=0, max_tokens=16)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine on a fresh event loop (pytest-asyncio is not a dependency)."""
    return asyncio.run(coro)


@dataclass
class Result:
    """A finished stream: every delta, the joined text and the last delta."""

    deltas: list[Delta]

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)

    @property
    def final(self) -> Delta:
        return self.deltas[-1]


_ids = iter(range(1_000_000))


def request(prompt: list[Message] | str, sampling: SamplingOptions = GREEDY) -> GenerationRequest:
    return GenerationRequest(f"req-{next(_ids)}", prompt, sampling)


async def collect(driver: CpuDriver, req: GenerationRequest) -> Result:
    return Result([delta async for delta in driver.generate(req)])


def uncached(delta: Delta) -> Delta:
    """``delta`` without ``cached_tokens``, which depends on what ran before (the prefix cache)."""
    return dataclasses.replace(delta, cached_tokens=0)


def generate(driver: CpuDriver, prompt: list[Message] | str, **sampling: Any) -> Result:
    options = SamplingOptions(**{"temperature": 0, "max_tokens": 16, **sampling})
    return run(collect(driver, request(prompt, options)))


@pytest.fixture(scope="module")
def driver() -> Iterator[CpuDriver]:
    drv = CpuDriver(slots=4)
    run(drv.load())
    yield drv
    run(drv.shutdown())


@pytest.fixture(scope="module")
def tokenizer(driver: CpuDriver) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(packaged.export_dir(), local_files_only=True)


# ------------------------------------------------------------------ generation


def test_greedy_generation_is_deterministic(driver: CpuDriver) -> None:
    first, second = generate(driver, CHAT), generate(driver, CHAT)
    assert first.text
    assert first.text == second.text
    assert first.final.token_ids == second.final.token_ids


def test_max_tokens_ends_with_length_and_exact_output_count(driver: CpuDriver) -> None:
    result = generate(driver, CHAT, max_tokens=5)
    assert result.final.finish_reason == "length"
    assert result.final.output_tokens == 5
    assert sum(len(d.token_ids) for d in result.deltas) == 5


def test_stop_string_cuts_the_output_before_it(driver: CpuDriver) -> None:
    full = generate(driver, CHAT).text
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    cut = generate(driver, CHAT, stop=("no such stop string", stop))
    assert cut.final.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]
    assert stop not in cut.text


def test_eos_ends_generation_with_stop(driver: CpuDriver) -> None:
    result = generate(driver, [{"role": "user", "content": "Say just: yes"}], max_tokens=16)
    assert result.final.finish_reason == "stop"
    assert result.final.output_tokens < 16
    assert "<|im_end|>" not in result.text


def test_seeded_sampling_is_reproducible(driver: CpuDriver) -> None:
    def sample(seed: int) -> str:
        return generate(driver, CHAT, temperature=1.0, top_p=0.95, seed=seed).text

    assert sample(7) == sample(7)
    assert len({sample(1), sample(2), sample(3)}) > 1  # the seed really drives sampling


def test_streamed_deltas_concatenate_to_the_final_text(driver: CpuDriver, tokenizer: Any) -> None:
    result = generate(driver, CHAT)
    ids = [i for d in result.deltas for i in d.token_ids]
    assert len(result.deltas) > 1
    assert result.final.finish_reason is not None
    assert all(d.finish_reason is None for d in result.deltas[:-1])
    assert [d.output_tokens for d in result.deltas] == sorted(
        d.output_tokens for d in result.deltas
    )
    assert len(ids) == result.final.output_tokens
    assert result.text == tokenizer.decode(ids, skip_special_tokens=True)


def _resumed(
    driver: CpuDriver, prompt: list[Message] | str, resume: list[int], **sampling: Any
) -> Result:
    options = SamplingOptions(**{"temperature": 0, "max_tokens": 16, **sampling})
    req = GenerationRequest(f"req-{next(_ids)}", prompt, options, resume_ids=resume)
    return run(collect(driver, req))


@pytest.mark.parametrize("cut", [1, 5, 11])
def test_resuming_from_resume_ids_continues_exactly_where_it_stopped(
    driver: CpuDriver, cut: int
) -> None:
    full = generate(driver, CHAT)
    ids = [i for d in full.deltas for i in d.token_ids]
    first = generate(driver, CHAT, max_tokens=cut)
    done = [i for d in first.deltas for i in d.token_ids]
    rest = _resumed(driver, CHAT, done)
    assert first.text + rest.text == full.text
    assert done + [i for d in rest.deltas for i in d.token_ids] == ids
    assert rest.final.output_tokens == full.final.output_tokens
    assert rest.final.finish_reason == full.final.finish_reason


def test_resuming_keeps_stop_strings_working_across_the_boundary(driver: CpuDriver) -> None:
    full = generate(driver, CHAT).text
    stop = full.split()[3]
    whole = generate(driver, CHAT, stop=(stop,))
    first = generate(driver, CHAT, max_tokens=2, stop=(stop,))
    rest = _resumed(driver, CHAT, [i for d in first.deltas for i in d.token_ids], stop=(stop,))
    assert first.text + rest.text == whole.text
    assert rest.final.finish_reason == "stop"


def test_a_resumed_request_already_at_max_tokens_ends_at_once(driver: CpuDriver) -> None:
    first = generate(driver, CHAT, max_tokens=4)
    rest = _resumed(driver, CHAT, [i for d in first.deltas for i in d.token_ids], max_tokens=4)
    assert (
        rest.text == "" and rest.final.finish_reason == "length" and rest.final.output_tokens == 4
    )


def test_count_tokens_matches_reported_prompt_tokens(driver: CpuDriver) -> None:
    for prompt in (CHAT, "The capital of France is"):
        counted = run(driver.count_tokens(prompt))
        assert counted == generate(driver, prompt, max_tokens=1).final.prompt_tokens


def test_raw_text_prompt_is_completed_without_chat_template(driver: CpuDriver) -> None:
    raw = "The capital of France is"
    result = generate(driver, raw, max_tokens=8)
    assert result.text.strip()
    assert result.final.prompt_tokens == run(driver.count_tokens(raw))
    assert result.final.prompt_tokens < run(driver.count_tokens([{"role": "user", "content": raw}]))


def test_long_prompt_is_prefilled_in_chunks(driver: CpuDriver) -> None:
    from drivers.cpu import PREFILL_CHUNK

    prompt = "Numbers: " + " ".join(str(i) for i in range(150))
    result = generate(driver, prompt, max_tokens=4)
    assert result.final.prompt_tokens > PREFILL_CHUNK
    assert result.final.output_tokens == 4


def test_greedy_output_matches_transformers_generate(driver: CpuDriver, tokenizer: Any) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        packaged.export_dir(), dtype=torch.bfloat16, local_files_only=True
    )
    prompt_ids = tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    expected = model.generate(prompt_ids, max_new_tokens=16, do_sample=False)[
        0, prompt_ids.shape[1] :
    ]
    result = generate(driver, CHAT)
    assert [i for d in result.deltas for i in d.token_ids] == expected.tolist()[
        : result.final.output_tokens
    ]


# ------------------------------------------------------------------ scheduling


def test_batched_greedy_outputs_match_one_at_a_time(driver: CpuDriver) -> None:
    # Different lengths make sequences leave the batch at different steps (re-layout).
    jobs: list[tuple[list[Message] | str, int]] = [
        (CHAT, 16),
        ([{"role": "user", "content": "Name three colours."}], 7),
        ("Once upon a time", 12),
        ([{"role": "user", "content": "What is 2 + 2?"}], 4),
    ]
    options = [SamplingOptions(temperature=0, max_tokens=n) for _, n in jobs]
    solo = [run(collect(driver, request(p, o))) for (p, _), o in zip(jobs, options, strict=True)]

    async def together() -> list[Result]:
        reqs = [request(p, o) for (p, _), o in zip(jobs, options, strict=True)]
        return await asyncio.gather(*(collect(driver, r) for r in reqs))

    for alone, joint in zip(solo, run(together()), strict=True):
        assert alone.text == joint.text
        assert uncached(alone.final) == uncached(joint.final)


def test_sequence_joining_a_running_batch_matches_its_solo_output(driver: CpuDriver) -> None:
    short = [{"role": "user", "content": "Hi"}]
    solo_long, solo_short = generate(driver, CHAT), generate(driver, short)

    async def staggered() -> tuple[Result, Result]:
        first = asyncio.create_task(collect(driver, request(CHAT)))
        while not driver.steps or not driver.live_request_ids():
            await asyncio.sleep(0)
        start = driver.steps
        while driver.steps < start + 5:  # let the first one decode a few tokens alone
            await asyncio.sleep(0.01)
        second = await collect(driver, request(short))
        return await first, second

    joint_long, joint_short = run(staggered())
    assert (joint_long.text, uncached(joint_long.final)) == (
        solo_long.text,
        uncached(solo_long.final),
    )
    assert (joint_short.text, uncached(joint_short.final)) == (
        solo_short.text,
        uncached(solo_short.final),
    )


def test_requests_beyond_slots_wait_and_then_complete(driver: CpuDriver) -> None:
    count = driver.slots + 2

    async def many() -> list[Result]:
        reqs = [
            request(f"Count to {i}:", SamplingOptions(temperature=0, max_tokens=3))
            for i in range(count)
        ]
        return await asyncio.gather(*(collect(driver, r) for r in reqs))

    results = run(many())
    assert [r.final.output_tokens for r in results] == [3] * count
    assert driver.live_request_ids() == frozenset()


def test_abort_ends_the_stream_with_abort_within_one_step(driver: CpuDriver) -> None:
    async def abort_after_first_delta() -> tuple[Delta, int, int, int]:
        req = request(CHAT, SamplingOptions(temperature=0, max_tokens=500))
        seen = steps_at_abort = 0
        async for delta in driver.generate(req):
            if delta.finish_reason is not None:
                return delta, seen, steps_at_abort, driver.steps
            if not steps_at_abort:
                seen, steps_at_abort = delta.output_tokens, driver.steps
                driver.abort(req.request_id)
        raise AssertionError("stream ended without a finish reason")

    final, seen, steps_at_abort, steps_at_end = run(abort_after_first_delta())
    assert final.finish_reason == "abort"
    # The step running when abort() was called may still finish; no step after it does.
    assert steps_at_end - steps_at_abort <= 2
    assert final.output_tokens <= seen + 2


def test_closing_the_stream_aborts_the_request(driver: CpuDriver) -> None:
    async def close_after_first_delta() -> tuple[str, int]:
        req = request(CHAT, SamplingOptions(temperature=0, max_tokens=500))
        stream = driver.generate(req)
        await anext(stream)
        await stream.aclose()
        start = driver.steps
        while req.request_id in driver.live_request_ids():
            await asyncio.sleep(0.01)
        return req.request_id, driver.steps - start

    _, steps = run(close_after_first_delta())
    assert steps <= 2


def test_prompt_longer_than_context_fails_only_that_request(driver: CpuDriver) -> None:
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


# ------------------------------------------------------------------ lifecycle


def test_info_describes_the_loaded_packaged_model(driver: CpuDriver) -> None:
    info = driver.info()
    assert (info.driver, info.model, info.state, info.slots) == (
        "cpu",
        packaged.MODEL_NAME,
        "ready",
        4,
    )
    assert info.max_context == 8192


def test_packaged_export_is_reused_not_redone() -> None:
    folder = packaged.ensure_exported()
    assert folder == packaged.export_dir()
    assert packaged.is_exported(folder)
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (folder / name).is_file(), name
    assert "quantization_config" not in (folder / "config.json").read_text()


def test_missing_model_folder_gives_a_clear_driver_error(tmp_path: Path) -> None:
    drv = CpuDriver(model=str(tmp_path / "nowhere"))
    with pytest.raises(DriverError, match="does not exist"):
        run(drv.load())
    assert drv.info().state == "failed"


def test_folder_that_is_not_a_model_gives_a_clear_driver_error(tmp_path: Path) -> None:
    with pytest.raises(DriverError, match="no config.json"):
        run(CpuDriver(model=str(tmp_path)).load())


def test_generate_before_load_raises_driver_error() -> None:
    async def attempt() -> None:
        async for _ in CpuDriver().generate(request(CHAT)):
            pass

    with pytest.raises(DriverError, match="load"):
        run(attempt())


def test_unknown_driver_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="known drivers: cpu"):
        make_driver("tpu")
    assert DRIVERS["cpu"] is CpuDriver
    assert isinstance(make_driver("cpu", slots=2), CpuDriver)


def test_importing_drivers_does_not_import_torch() -> None:
    code = "import sys, drivers; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------ text pieces


def test_incremental_detokenising_never_splits_a_character(tokenizer: Any) -> None:
    text = "Vague 🌊 et café — 世界 ok"
    detok = _Detokenizer(tokenizer)
    pieces = [detok.push(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stop_string_split_across_pieces_is_found_and_cut() -> None:
    stop = _StopText(["END"])
    assert stop.push("abc E") == ("abc ", False)
    assert stop.push("N") == ("", False)
    assert stop.push("Dxyz") == ("", True)


def test_text_that_only_looked_like_a_stop_string_is_released() -> None:
    stop = _StopText(["END"])
    assert stop.push("E") == ("", False)
    assert stop.push("NX") == ("ENX", False)
    assert stop.push("EN") == ("", False)
    assert stop.flush() == "EN"


def test_the_next_turn_reuses_the_previous_turns_kv_and_gives_the_same_text(
    driver: CpuDriver,
) -> None:
    chat: list[Message] = [
        {"role": "system", "content": "You are a helpful assistant. " * 10},
        {"role": "user", "content": "Tell me about the sea."},
    ]
    first = generate(driver, chat)
    follow = [
        *chat,
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "And the sky?"},
    ]
    hits_before = driver.prefix_stats()[0]
    cached = generate(driver, follow)
    assert driver.prefix_stats()[0] == hits_before + 1
    assert cached.final.cached_tokens > first.final.prompt_tokens // 2
    plain = CpuDriver(slots=1, prefix_cache_tokens=0)
    run(plain.load())
    try:
        uncached = generate(plain, follow)
    finally:
        run(plain.shutdown())
    assert uncached.final.cached_tokens == 0
    assert cached.text == uncached.text


def test_a_preempted_request_resumes_from_its_cached_kv(driver: CpuDriver) -> None:
    full = generate(driver, CHAT)
    first = generate(driver, CHAT, max_tokens=6)
    done = [i for d in first.deltas for i in d.token_ids]
    rest = _resumed(driver, CHAT, done)
    assert rest.final.cached_tokens >= first.final.prompt_tokens + len(done) - 1
    assert first.text + rest.text == full.text
