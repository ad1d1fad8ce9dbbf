"""Text plumbing shared by the drivers that tokenize locally (cpu, vllm, openai): prompt
encoding with the chat template, incremental detokenization that never splits a
character, stop strings held back across token boundaries, finding the model folder and
loading its tokenizer, and :class:`TokenizingDriver`, the front end those drivers share
(state, ``info``, ``count_tokens``, load progress and failures).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from drivers import packaged
from drivers.base import Driver, DriverError, DriverState, Message, ModelInfo, Progress

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "Detokenizer",
    "PromptEncoder",
    "StopText",
    "TokenizingDriver",
    "hub_offline",
    "load_tokenizer",
    "resolve_model_dir",
]

_REPLACEMENT_CHAR = "\ufffd"


class Detokenizer:
    """Turns output token ids into text incrementally, never splitting a character.

    Decodes a small window of recent tokens and emits only what the newest token
    added, holding back while the window ends in a partial UTF-8 sequence (U+FFFD).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start: context so a token decodes as it would mid-text
        self._read = 0  # tokens before this index have been turned into text

    def push(self, token_id: int) -> str:
        """Add one token; return the new text it completes (maybe empty)."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True) if ids else ""


class StopText:
    """Holds back output that could still become a stop string, and finds stop strings.

    Invariant: ``_held`` is the only text not yet released, and no stop string occurs
    in it, so a match can only involve the newest text plus ``_held``.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add ``text``; return ``(text safe to release, whether a stop string ended it)``."""
        if not self._stops:
            return text, False
        self._held += text
        hits = [i for i in (self._held.find(s) for s in self._stops) if i >= 0]
        if hits:
            released, self._held = self._held[: min(hits)], ""
            return released, True
        keep = self._partial_stop_length()
        cut = len(self._held) - keep
        released, self._held = self._held[:cut], self._held[cut:]
        return released, False

    def flush(self) -> str:
        """Release whatever is held (the output ended without completing a stop string)."""
        held, self._held = self._held, ""
        return held

    def _partial_stop_length(self) -> int:
        """Length of the longest end of ``_held`` that begins some stop string."""
        best = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(self._held)), best, -1):
                if self._held.endswith(stop[:size]):
                    best = size
                    break
        return best


class PromptEncoder:
    """Prompt -> token ids, shared by the engine and ``count_tokens`` so they agree."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        # The Rust tokenizer may raise "Already borrowed" under concurrent calls.
        self._lock = threading.Lock()

    def encode(self, prompt: list[Message] | str) -> list[int]:
        """Chat messages get the chat template and a generation prompt; text is encoded as is."""
        with self._lock:
            if isinstance(prompt, str):
                return list(self._tokenizer(prompt)["input_ids"])
            if not self._tokenizer.chat_template:
                raise DriverError(
                    "This model has no chat template; send the prompt as raw text instead."
                )
            text = self._tokenizer.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=False
            )
            # The template already wrote any special tokens it wants.
            return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])


def resolve_model_dir(model: str | None, progress: Progress) -> Path:
    """The folder to load: the packaged model's export, or a checked local folder."""
    if model is None:
        return packaged.ensure_exported(progress)
    path = Path(model).expanduser()
    if not path.is_dir():
        raise DriverError(
            f"Model folder {path} does not exist. Pass the path of a local Hugging Face "
            f"model folder, or no model to use the packaged {packaged.MODEL_NAME}."
        )
    if not (path / "config.json").is_file():
        raise DriverError(
            f"{path} is not a Hugging Face model folder (it has no config.json). Pass a "
            f"folder saved with save_pretrained, or no model to use the packaged "
            f"{packaged.MODEL_NAME}."
        )
    return path


def hub_offline() -> None:
    """Never let transformers reach for a model hub: everything a driver loads is on disk.
    Only defaults: a variable the user set wins."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


#: Serialises the first import of transformers' lazy classes across loading threads.
_IMPORT_LOCK = threading.Lock()


def load_tokenizer(path: Path, hint: str) -> PreTrainedTokenizerBase:
    """The model folder's tokenizer, from local files only (blocking: run it off the
    loop). Raises :class:`DriverError` saying why, followed by ``hint`` (what to do)."""
    hub_offline()
    # transformers imports its classes lazily, and two threads importing at once (two
    # models loading together) can see a half-initialised module: import under a lock.
    with _IMPORT_LOCK:
        from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise DriverError(f"Could not load the tokenizer from {path}: {exc}. {hint}") from exc


class TokenizingDriver(Driver):
    """The front end of a driver that tokenizes prompts locally (cpu, vllm, openai).

    It keeps the driver's state and its detail, the model's context window, the bytes
    the model occupies and, once loaded, the :class:`PromptEncoder` that both
    ``count_tokens`` and generation use, so the two always agree. A subclass sets them
    in ``load`` and says in :meth:`_ready` what else it needs before it can generate.
    """

    def __init__(self, model: str | None) -> None:
        self._model_arg = model
        self._state: DriverState = "unloaded"
        #: What ``info().detail`` says: the load's latest step, its time, or its failure.
        self._detail = ""
        self._max_context = 0  # 0 until loaded
        self._memory_bytes: int | None = None  # None: unknown (or not loaded)
        self._encoder: PromptEncoder | None = None

    def info(self) -> ModelInfo:
        """Driver name, model, context window (0 until loaded), slots, state, detail and
        the model's bytes (None until loaded)."""
        return ModelInfo(
            driver=self.name,
            model=self._model_arg or packaged.MODEL_NAME,
            max_context=self._max_context,
            slots=self.slots,
            state=self._state,
            detail=self._detail,
            memory_bytes=self._memory_bytes,
        )

    async def count_tokens(self, prompt: list[Message] | str) -> int:
        """Tokens ``prompt`` occupies, exactly as ``generate`` reports ``prompt_tokens``."""
        encoder = self._ready()[1]
        return len(await asyncio.to_thread(encoder.encode, prompt))

    @abc.abstractmethod
    def _ready(self) -> tuple[object, PromptEncoder]:
        """``(backend, encoder)`` of a ready driver; raise :meth:`_not_ready` otherwise."""

    def _not_ready(self) -> DriverError:
        """The error for a request made while the driver is not ready."""
        return DriverError(
            f"The {self.name} driver is {self._state}, not ready"
            + (f" ({self._detail})." if self._detail else "; call load() first.")
        )

    def _load_progress(self, progress: Progress | None) -> tuple[Progress, Progress]:
        """``(note, report)`` for a load run from this loop. ``note`` (this loop only)
        shows a step in ``info().detail`` (``llmos kernel start`` polls it) and passes it
        to ``progress``; ``report`` does the same from any thread."""
        caller = asyncio.get_running_loop()

        def note(description: str, fraction: float | None) -> None:
            self._detail = description if fraction is None else f"{description} ({fraction:.0%})"
            if progress is not None:
                progress(description, fraction)

        def report(description: str, fraction: float | None) -> None:
            caller.call_soon_threadsafe(note, description, fraction)

        return note, report

    @contextlib.contextmanager
    def _load_failures(self) -> Iterator[None]:
        """Around a load's work: a failure makes the state ``failed`` with the reason as
        detail. A :class:`DriverError` or a cancellation goes on as it is; any other
        exception becomes a DriverError naming the driver."""
        try:
            yield
        except (DriverError, asyncio.CancelledError) as exc:
            self._state, self._detail = "failed", str(exc) or "load cancelled"
            raise
        except Exception as exc:
            self._state, self._detail = "failed", str(exc)
            raise DriverError(f"The {self.name} driver failed to load: {exc}") from exc
