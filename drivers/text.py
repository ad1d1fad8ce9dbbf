"""Text plumbing shared by the drivers that tokenize locally (cpu, vllm, openai): prompt
encoding with the chat template, incremental detokenization that never splits a
character, stop strings held back across token boundaries, and finding the model folder.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from drivers import packaged
from drivers.base import DriverError, Message, Progress

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Detokenizer", "PromptEncoder", "StopText", "resolve_model_dir"]

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
