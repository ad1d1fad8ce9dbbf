"""A thread that runs its own asyncio loop, for drivers whose engine or I/O must live on
one loop whatever loop their callers use (vllm's ``AsyncLLM``, openai's HTTP client)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["LoopThread"]


class LoopThread:
    """One daemon thread running ``self.loop`` until :meth:`stop`."""

    def __init__(self, name: str, join_timeout: float = 30.0) -> None:
        self.loop = asyncio.new_event_loop()
        self._join_timeout = join_timeout
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop (from any thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and await its result from another loop."""
        return await asyncio.wrap_future(self.submit(coro))

    def call(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` soon on the loop (ignored once the loop is closed)."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(fn)

    def stop(self) -> None:
        """Stop the loop and join the thread (blocking)."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=self._join_timeout)
