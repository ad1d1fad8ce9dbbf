"""A SIMULATED driver: no model, a fixed token rate, deterministic output.

For scheduler studies and benchmarks at scale (hundreds of processes, no CPU spent on a
model) and for fast checks of kernel mechanism. It is never a stand-in where the real
model can run: integration tests use ``drivers.cpu``.

Its "tokens" are words: token id ``i`` is the word ``w{i}``; a prompt's tokens are its
whitespace-separated words (plus one per chat message). The output for a prompt is
``w{h}, w{h+1}, ...`` where ``h`` is a hash of the prompt, so greedy output is a pure
function of the prompt, as with a real model.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

from drivers.base import Delta, Driver, GenerationRequest, Message, ModelInfo, Progress


class SimDriver(Driver):
    """Simulated model: ``tokens_per_s`` per sequence, ``slots`` sequences at once."""

    name = "sim"

    def __init__(self, model: str | None = None, slots: int = 4, tokens_per_s: float = 200.0,
                 max_context: int = 8192, eos_after: int | None = None) -> None:
        self._slots = slots
        self.model = model or "simulated"
        self.step_s = 1.0 / tokens_per_s
        self.max_context = max_context
        self.eos_after = eos_after  # emit "stop" after this many tokens (None: never)
        self._aborted: set[str] = set()
        self._state: str = "unloaded"

    @property
    def slots(self) -> int:
        return self._slots

    async def load(self, progress: Progress | None = None) -> None:
        self._state = "ready"

    def info(self) -> ModelInfo:
        return ModelInfo("sim", self.model, self.max_context, self._slots, self._state,  # type: ignore[arg-type]
                         "simulated driver (no model)")

    @staticmethod
    def _count(prompt: list[Message] | str) -> int:
        if isinstance(prompt, str):
            return len(prompt.split())
        return sum(1 + len(msg["content"].split()) for msg in prompt) + 1

    async def count_tokens(self, prompt: list[Message] | str) -> int:
        return self._count(prompt)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        rid, opts = request.request_id, request.sampling
        n_prompt = self._count(request.prompt)
        start = int(hashlib.sha256(repr(request.prompt).encode()).hexdigest()[:6], 16)
        produced = list(request.resume_ids)
        text_so_far = "".join(f" w{t}" for t in produced)
        try:
            while True:
                if rid in self._aborted:
                    yield Delta("", [], n_prompt, len(produced), "abort")
                    return
                if len(produced) >= opts.max_tokens or n_prompt + len(produced) >= self.max_context:
                    yield Delta("", [], n_prompt, len(produced), "length")
                    return
                if self.eos_after is not None and len(produced) >= self.eos_after:
                    yield Delta("", [], n_prompt, len(produced), "stop")
                    return
                await asyncio.sleep(self.step_s)
                tok = start + len(produced)
                piece = f" w{tok}"
                produced.append(tok)
                for stop in opts.stop:
                    if stop in text_so_far + piece:
                        yield Delta("", [], n_prompt, len(produced), "stop")
                        return
                text_so_far += piece
                yield Delta(piece, [tok], n_prompt, len(produced))
        finally:
            self._aborted.discard(rid)

    def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)
