"""Model residency: which of the kernel's models are loaded, when it serves more models
than the machine may hold at once (``llmos kernel start --max-loaded N``).

Mechanism: every use of a model (a generate call, from before its prompt is counted to
its last token) holds a *lease* on it. A model with leases is never put to sleep. A call
for a sleeping model waits (its process stays READY) until the model is awake: if fewer
than ``max_loaded`` models are awake it is woken at once; otherwise an awake model
without leases is put to sleep first (``Driver.sleep``: the drivers unload the weights
and engine; ``Driver.wake`` loads them again, from the exported cache).

Policy: the victim is the least recently used idle model. Against thrashing, a model
that woke less than ``min_awake_s`` ago is not evicted while calls for it still wait.
Against starvation, once a call for a sleeping model has waited ``min_awake_s``, awake
models that have been up that long take no new leases until they drain, so the one
sleeping model in demand gets its turn even when the others are never idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal

from drivers.base import Driver, DriverError

log = logging.getLogger("llmos.kernel")

#: A model's residency state. ``failed``: its (first) load failed; calls get EIO.
Residence = Literal["loading", "ready", "failed", "asleep", "sleeping", "waking"]
_AWAKE: frozenset[str] = frozenset({"loading", "ready", "sleeping", "waking"})

#: Default seconds a woken model stays in while calls for it wait (see the module doc).
MIN_AWAKE_S = 5.0


@dataclass
class _Model:
    name: str
    driver: Driver
    state: Residence
    error: DriverError | None = None
    leases: int = 0
    waiting: int = 0  # calls waiting for this model to be awake (or to take leases again)
    waiting_since: float | None = None  # when the oldest of them began to wait
    last_used: float = 0.0
    awake_since: float = 0.0
    wakes: int = 0
    sleeps: int = 0
    wake_s: float = 0.0  # seconds spent waking, all wakes together
    failures: int = 0  # wakes that failed (each fails the calls waiting for it)


class Residency:
    """Loads, sleeps and wakes the kernel's models; hands out leases on them."""

    def __init__(
        self,
        drivers: dict[str, Driver],
        max_loaded: int | None = None,
        min_awake_s: float = MIN_AWAKE_S,
        progress: Callable[[str], Callable[[str, float | None], None]] | None = None,
    ) -> None:
        if max_loaded is not None and max_loaded < 1:
            raise ValueError("max_loaded must be at least 1")
        self.max_loaded = min(max_loaded or len(drivers), len(drivers))
        self.min_awake_s = min_awake_s
        self._progress = progress
        self._models = {name: _Model(name, d, "asleep") for name, d in drivers.items()}
        self._changed = asyncio.Event()  # set (and replaced) whenever a state changes
        self._tasks: set[asyncio.Task[None]] = set()

    # -- life ---------------------------------------------------------------------------

    def start(self) -> None:
        """Load the first ``max_loaded`` models in the background; the rest start asleep."""
        for model in list(self._models.values())[: self.max_loaded]:
            model.state = "loading"
            self._spawn(self._wake(model, first=True))

    async def first_loads(self) -> None:
        """Wait until the start-up loads have finished (successfully or not)."""
        while any(m.state == "loading" for m in self._models.values()):
            await self._changed.wait()

    async def close(self) -> None:
        """Cancel loads and swaps in progress (the kernel then shuts every driver down)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- reading ------------------------------------------------------------------------

    def state(self, name: str) -> Residence:
        return self._models[name].state

    def stats(self, name: str) -> dict[str, float | int]:
        """Wakes, sleeps and seconds spent waking so far for model ``name``."""
        m = self._models[name]
        return {"wakes": m.wakes, "sleeps": m.sleeps, "wake_s": round(m.wake_s, 3)}

    def awake(self) -> list[str]:
        return [m.name for m in self._models.values() if m.state in _AWAKE]

    # -- leases -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def use(self, name: str) -> AsyncIterator[Driver]:
        """Hold model ``name`` awake for the body (see :meth:`acquire`)."""
        driver = await self.acquire(name)
        try:
            yield driver
        finally:
            self.release(name)

    async def acquire(self, name: str) -> Driver:
        """Take a lease on model ``name``, waiting while it sleeps or wakes; pair with
        :meth:`release`. Raises :class:`DriverError` if it failed to load or to wake."""
        model = self._models[name]
        model.waiting += 1
        if model.waiting_since is None:
            model.waiting_since = time.monotonic()
        failures = model.failures
        try:
            while True:
                if model.state == "failed" or model.failures != failures:
                    assert model.error is not None
                    raise model.error
                if model.state == "ready" and not self._draining(model):
                    model.leases += 1
                    return model.driver
                if model.state == "asleep":
                    self._make_room_for(model)
                await self._wait_a_little()
        finally:
            model.waiting -= 1
            if model.waiting == 0:
                model.waiting_since = None

    def release(self, name: str) -> None:
        """Give back a lease taken with :meth:`acquire`."""
        model = self._models[name]
        model.leases -= 1
        model.last_used = time.monotonic()
        self._notify()

    async def _wait_a_little(self) -> None:
        # Time also changes the answer (min_awake_s passing), not only events.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(self.min_awake_s / 4, 0.05)):
                await self._changed.wait()  # this event object, even if replaced meanwhile

    def _draining(self, model: _Model) -> bool:
        """True when ``model`` should take no new leases: a sleeping model has waited
        ``min_awake_s`` and this one has been awake at least that long."""
        now = time.monotonic()
        if now - model.awake_since < self.min_awake_s:
            return False
        return any(
            m.state == "asleep"
            and m.waiting
            and m.waiting_since is not None
            and now - m.waiting_since >= self.min_awake_s
            for m in self._models.values()
        )

    def _make_room_for(self, model: _Model) -> None:
        """Wake ``model`` (or the sleeping model waited for longest) if there is room,
        else put the best victim to sleep (the swap itself runs as a task)."""
        # The sleeping model waited for longest goes first, whoever's call gets here.
        model = min(
            (
                m
                for m in self._models.values()
                if m.state == "asleep" and m.waiting and m.waiting_since is not None
            ),
            key=lambda m: m.waiting_since or 0.0,
            default=model,
        )
        awake = [m for m in self._models.values() if m.state in _AWAKE]
        if len(awake) < self.max_loaded:
            model.state = "waking"
            self._spawn(self._wake(model))
            return
        if any(m.state in ("sleeping", "waking", "loading") for m in awake):
            return  # a swap is under way: wait for it
        now = time.monotonic()
        idle = [
            m
            for m in awake
            if m.state == "ready"
            and m.leases == 0
            and not (m.waiting and now - m.awake_since < self.min_awake_s)
        ]
        if idle:
            victim = min(idle, key=lambda m: m.last_used)
            victim.state = "sleeping"
            self._spawn(self._sleep(victim))

    # -- swaps --------------------------------------------------------------------------

    def _spawn(self, work: object) -> None:
        task = asyncio.get_running_loop().create_task(work)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _wake(self, model: _Model, first: bool = False) -> None:
        """Load (``first``) or wake ``model``; its state is already loading/waking."""
        started = time.monotonic()
        progress = self._progress(model.name) if self._progress is not None else None
        try:
            if first:
                await model.driver.load(progress)
            else:
                await model.driver.wake(progress)
        except Exception as exc:
            error = (
                exc if isinstance(exc, DriverError) else DriverError(str(exc) or type(exc).__name__)
            )
            log.error("model %s failed to %s: %s", model.name, "load" if first else "wake", error)
            model.error = error
            if first:  # a model that never loaded stays failed
                model.state = "failed"
            else:  # the calls waiting for this wake fail; the next call tries again
                model.state = "asleep"
                model.failures += 1
                with contextlib.suppress(Exception):
                    await model.driver.shutdown()  # whatever the failed wake left
        else:
            model.state = "ready"
            model.awake_since = model.last_used = time.monotonic()
            if first:
                log.info("model %s ready: %s", model.name, model.driver.info())
            else:
                model.wakes += 1
                model.wake_s += model.awake_since - started
                log.info("model %s woke in %.1fs", model.name, model.awake_since - started)
        self._notify()

    async def _sleep(self, model: _Model) -> None:
        try:
            await model.driver.sleep()
            model.sleeps += 1
            log.info("model %s is asleep (making room for another)", model.name)
        except Exception:
            log.exception("model %s failed to go to sleep; unloading it", model.name)
            with contextlib.suppress(Exception):
                await model.driver.shutdown()
        model.state = "asleep"
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
