"""More models than fit: the kernel keeps at most ``--max-loaded`` loaded, puts the least
recently used idle one to sleep to wake the one a process needs, never puts a model in
use to sleep, and lets no model in demand starve."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from drivers.base import DriverError, GenerationRequest, SamplingOptions
from drivers.sim import SimDriver
from kernel.residency import Residency
from tests.conftest import wait_until_async
from tests.kernels import Daemon


async def _started(
    drivers: dict[str, SimDriver] | None = None,
    max_loaded: int | None = 1,
    min_awake_s: float = 5.0,
    b: SimDriver | None = None,
) -> Residency:
    """A residency over sim models ``a`` and ``b`` (or ``drivers``), its first loads done."""
    res = Residency(drivers or {"a": SimDriver(), "b": b or SimDriver()}, max_loaded, min_awake_s)
    res.start()
    await res.first_loads()
    return res


async def _generate(driver: SimDriver) -> int:
    request = GenerationRequest("r", "hello", SamplingOptions(max_tokens=3, temperature=0.0))
    return sum([len(d.token_ids) async for d in driver.generate(request)])


def test_models_beyond_max_loaded_start_asleep_and_wake_on_first_use() -> None:
    async def go() -> None:
        res = await _started()
        assert (res.state("a"), res.state("b")) == ("ready", "asleep")
        async with res.use("b") as b:
            assert (res.state("a"), res.state("b")) == ("asleep", "ready")
            assert await _generate(b) == 3
        a = res._models["a"].driver
        with pytest.raises(DriverError, match="shut down"):
            await _generate(a)  # type: ignore[arg-type]  # asleep means unloaded
        assert res.stats("b")["wakes"] == 1 and res.stats("a")["sleeps"] == 1
        async with res.use("a") as a:  # and back
            assert await _generate(a) == 3
        assert res.awake() == ["a"]
        await res.close()

    asyncio.run(go())


def test_without_max_loaded_every_model_loads_and_none_sleeps() -> None:
    async def go() -> None:
        res = await _started(
            {"a": SimDriver(), "b": SimDriver(), "c": SimDriver()}, max_loaded=None
        )
        for name in "abc":
            async with res.use(name):
                pass
        assert res.awake() == ["a", "b", "c"]
        assert all(res.stats(n)["sleeps"] == 0 for n in "abc")
        await res.close()

    asyncio.run(go())


def test_a_model_in_use_is_never_put_to_sleep() -> None:
    async def go() -> None:
        res = await _started(min_awake_s=0.0)
        lease = await res.acquire("a")
        wants_b = asyncio.create_task(res.acquire("b"))
        await wait_until_async(lambda: res._models["b"].waiting == 1)  # b's call is waiting
        await asyncio.sleep(0.5)  # and keeps asking (every 50 ms): a must stay in use all along
        assert not wants_b.done() and res.state("a") == "ready" and res.state("b") == "asleep"
        assert await _generate(lease) == 3  # type: ignore[arg-type]
        res.release("a")
        await asyncio.wait_for(wants_b, 5)
        assert (res.state("a"), res.state("b")) == ("asleep", "ready")
        res.release("b")
        await res.close()

    asyncio.run(go())


def test_a_model_never_idle_still_yields_to_a_waiting_one_after_min_awake() -> None:
    """Overlapping leases keep model a busy forever; b must still get its turn."""

    async def go() -> float:
        res = await _started(min_awake_s=0.3)
        stop = asyncio.Event()

        async def busy_a() -> None:
            while not stop.is_set():
                async with res.use("a"):
                    await asyncio.sleep(0.1)

        workers = [asyncio.create_task(busy_a()) for _ in range(3)]
        # all three hold leases; each takes its next one as it gives one back, so a is never idle
        await wait_until_async(lambda: res._models["a"].leases == 3)
        t0 = time.monotonic()
        async with res.use("b"):
            waited = time.monotonic() - t0
        stop.set()
        await asyncio.gather(*workers)
        await res.close()
        return waited

    waited = asyncio.run(go())
    assert waited < 5.0  # about min_awake_s plus one lease: a drained instead of starving b


def test_a_failed_wake_fails_the_waiting_calls_and_the_next_call_retries() -> None:
    class FlakyWake(SimDriver):
        fail_next = False

        async def wake(self, progress=None) -> None:
            if self.fail_next:
                self.fail_next = False
                raise DriverError("out of memory (simulated)")
            await super().wake(progress)

    async def go() -> None:
        b = FlakyWake()
        res = await _started(b=b)
        b.fail_next = True
        with pytest.raises(DriverError, match="out of memory"):
            async with res.use("b"):
                pass
        assert res.state("b") == "asleep"
        async with res.use("b") as driver:  # the next call wakes it for real
            assert await _generate(driver) == 3  # type: ignore[arg-type]
        await res.close()

    asyncio.run(go())


def test_max_loaded_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Residency({"a": SimDriver()}, 0)


def test_a_process_waiting_for_its_model_to_wake_is_ready_and_the_model_shows_waking(
    tmp_path: Path,
) -> None:
    import threading

    daemon = Daemon(
        tmp_path,
        "--driver",
        "sim",
        "--model-name",
        "a",
        "--max-loaded",
        "1",
        "--min-awake",
        "0",
        "--serve",
        "name=b,driver=sim,load_s=1.5",
    )
    daemon.start()
    try:
        with daemon.admin() as admin:
            assert {m.name: m.state for m in admin.info().models} == {"a": "ready", "b": "asleep"}
            p = admin.spawn("on-b", model="b")
            result: dict = {}
            worker = threading.Thread(
                target=lambda: result.update(
                    p.call("llm.generate", {"prompt": "hi", "max_tokens": 3})
                )
            )
            worker.start()
            seen: set[tuple[str, str]] = set()
            t0 = time.monotonic()
            while worker.is_alive() and time.monotonic() - t0 < 30:
                row = {r.pid: r.state for r in admin.ps()}[p.pid]
                seen.add((row, {m.name: m.state for m in admin.info().models}["b"]))
                time.sleep(0.05)
            worker.join(30)
            assert ("READY", "waking") in seen
            assert result["usage"]["output_tokens"] == 3
            assert {m.name: m.state for m in admin.info().models} == {"a": "asleep", "b": "ready"}
            assert {r.pid: r.state for r in admin.ps()}[p.pid] == "WAITING"
    finally:
        daemon.stop()


@pytest.mark.model
def test_the_kernel_swaps_real_models_on_demand_and_a_woken_model_answers_the_same(
    tmp_path: Path,
) -> None:
    """Two CPU-driver models, room for one: each process's generate wakes its model (the
    other sleeps), and greedy output after a sleep/wake cycle is unchanged."""
    daemon = Daemon(
        tmp_path,
        "--driver",
        "cpu",
        "--slots",
        "1",
        "--model-name",
        "first",
        "--max-loaded",
        "1",
        "--serve",
        "name=second,driver=cpu,slots=1",
    )
    daemon.start()
    try:
        with daemon.admin() as admin:
            states = {m.name: m.state for m in admin.info().models}
            assert states == {"first": "ready", "second": "asleep"}
            p1 = admin.spawn("one", model="first")
            p2 = admin.spawn("two", model="second")
            args = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0.0}
            before = p1.call("llm.generate", args)["text"]
            on_second = p2.call("llm.generate", args)["text"]
            stat = {m.name: m for m in admin.stat(procs=False).models}
            assert (stat["first"].state, stat["second"].state) == ("asleep", "ready")
            assert (
                stat["second"].wakes == 1
                and stat["first"].sleeps == 1
                and stat["second"].wake_s > 0
            )
            after = p1.call("llm.generate", args)["text"]
            assert before == on_second == after  # same weights, reloaded: the same greedy text
            assert {m.name: m.wakes for m in admin.info().models} == {"first": 1, "second": 1}
    finally:
        daemon.stop()
