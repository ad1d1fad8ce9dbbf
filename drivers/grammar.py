"""Structured output with xgrammar: a response format -> a grammar -> a per-sequence matcher.

Every driver that constrains its output goes through here, so a format means the same
language everywhere:

* :func:`to_grammar` parses a :class:`ResponseFormat` into an xgrammar ``Grammar``
  without a tokenizer (cheap): an invalid schema, regex or grammar fails here with a
  :class:`FormatError` sentence.
* :class:`GrammarCache` compiles grammars against one model's tokenizer (the costly part:
  the token masks) on a worker thread, at most once per distinct format.
* :class:`Constraint` is one sequence's matcher: it masks the logits of the next token to
  those the grammar allows, accepts the sampled token, and replays already generated
  tokens when a preempted generation resumes.

JSON is laid out compactly (``{"a":1,"b":[2,3]}``): no free whitespace, because a small
model allowed whitespace between tokens may emit it forever. The vLLM driver asks vLLM's
xgrammar backend for the same layout (``disable_any_whitespace``).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from drivers.base import DriverError, FormatError, ResponseFormat, UnsupportedError

if TYPE_CHECKING:
    import torch
    import xgrammar as xgr

#: Seconds a format may take to compile before the request is refused (EINVAL); the
#: compile itself cannot be interrupted and finishes on its worker thread.
COMPILE_TIMEOUT_S = 30.0
#: Compiled grammars kept per model (least recently used dropped first).
CACHE_ENTRIES = 64
#: JSON separators (item, key) with whitespace turned off; the same as vLLM's.
JSON_SEPARATORS = (",", ":")
#: What ``json_object`` means: any JSON object.
ANY_OBJECT_SCHEMA = '{"type": "object"}'
_XGR_PREFIX = re.compile(r"^\[[0-9:]+\] [^ ]+:[0-9]+: ")
_XGR_CHECK = re.compile(r"^Check failed: .*? is false: ")


def to_grammar(fmt: ResponseFormat) -> xgr.Grammar:
    """The format's grammar; :class:`FormatError` says what is wrong with an invalid one."""
    xgr = _xgrammar()

    if "\x00" in fmt.spec or any("\x00" in c for c in fmt.choices):
        raise FormatError(f"the {fmt.type} must not contain a NUL character")
    try:
        if fmt.type == "json_schema":
            return xgr.Grammar.from_json_schema(
                fmt.spec, any_whitespace=False, separators=JSON_SEPARATORS
            )
        if fmt.type == "json_object":
            return xgr.Grammar.from_json_schema(
                ANY_OBJECT_SCHEMA, any_whitespace=False, separators=JSON_SEPARATORS
            )
        if fmt.type == "choice":
            if not fmt.choices:
                raise FormatError("a choice format needs at least one choice")
            return xgr.Grammar.from_ebnf(choice_ebnf(fmt.choices))
        if fmt.type == "regex":
            return xgr.Grammar.from_regex(fmt.spec)
        if fmt.type == "grammar":
            return xgr.Grammar.from_ebnf(fmt.spec)
    except FormatError:
        raise
    except Exception as exc:  # xgrammar raises RuntimeError (and subclasses) with its reason
        raise FormatError(f"invalid {_NAMES[fmt.type]}: {_reason(exc)}") from None
    raise FormatError(f"unknown response format type {fmt.type!r}")


_NAMES = {
    "json_schema": "JSON schema",
    "json_object": "JSON object format",
    "choice": "choice list",
    "regex": "regular expression",
    "grammar": "EBNF grammar",
}


def _xgrammar() -> Any:
    """The xgrammar module, or :class:`UnsupportedError` saying how to get it."""
    try:
        import xgrammar
    except ImportError as exc:
        raise UnsupportedError(
            f"structured output needs xgrammar, which failed to import ({exc}); install the "
            f"project's dependencies (bash scripts/setup.sh)"
        ) from None
    return xgrammar


def choice_ebnf(choices: Iterable[str]) -> str:
    """An EBNF grammar whose language is exactly ``choices`` (as vLLM builds it)."""
    escapes = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}

    def escape(ch: str) -> str:
        if ch in escapes:
            return escapes[ch]
        return f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch

    return "root ::= " + " | ".join('"' + "".join(map(escape, c)) + '"' for c in choices)


def _reason(exc: BaseException) -> str:
    """xgrammar's message without its timestamp/source-line prefix, bounded in length."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = _XGR_CHECK.sub("", _XGR_PREFIX.sub("", text))
    text = text.split(" The JSON string is:")[0]  # xgrammar echoes the whole input
    return text if len(text) <= 300 else text[:297] + "..."


def schema_text(schema: dict[str, Any]) -> str:
    """A JSON Schema as compact JSON text, keys in their order (it is the properties' order)."""
    return json.dumps(schema, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


class GrammarCache:
    """Grammars compiled for one tokenizer, by format; thread-safe.

    ``vocab_size`` is the width of the model's logits (it may exceed the tokenizer's);
    ``stop_ids`` are the ids that end a generation, the only ones allowed once the
    grammar is complete.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Iterable[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._stop_ids = sorted(stop_ids)
        self._compiler: xgr.GrammarCompiler | None = None
        self._compiled: OrderedDict[ResponseFormat, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.compiles = 0  # grammars compiled so far (tests check the cache)

    def compile(self, fmt: ResponseFormat) -> xgr.CompiledGrammar:
        """The compiled grammar for ``fmt`` (blocking: run it off the event loop)."""
        with self._lock:
            hit = self._compiled.get(fmt)
            if hit is not None:
                self._compiled.move_to_end(fmt)
                return hit
        grammar = to_grammar(fmt)
        try:
            compiled = self._get_compiler().compile_grammar(grammar)
        except Exception as exc:
            raise FormatError(
                f"the {_NAMES[fmt.type]} cannot be compiled: {_reason(exc)}"
            ) from None
        with self._lock:
            self.compiles += 1
            self._compiled[fmt] = compiled
            while len(self._compiled) > CACHE_ENTRIES:
                self._compiled.popitem(last=False)
        return compiled

    async def compile_async(self, fmt: ResponseFormat) -> xgr.CompiledGrammar:
        """:meth:`compile` on a worker thread, refused if it takes over COMPILE_TIMEOUT_S."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(self.compile, fmt), COMPILE_TIMEOUT_S)
        except TimeoutError:
            raise FormatError(
                f"the {_NAMES[fmt.type]} took over {COMPILE_TIMEOUT_S:g} s to compile; simplify it"
            ) from None

    def _get_compiler(self) -> xgr.GrammarCompiler:
        import xgrammar as xgr

        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self.vocab_size, stop_token_ids=self._stop_ids
                )
                # Compiled grammars are cached here, by format; xgrammar's own cache is off.
                self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
            return self._compiler


class Constraint:
    """One sequence's place in its grammar: masks next-token logits, accepts tokens."""

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int) -> None:
        import xgrammar as xgr

        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._vocab_size = vocab_size

    @property
    def terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted."""
        return self._matcher.is_terminated()

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (one position, ``[vocab]``) as float32 with every token the grammar
        forbids next set to -inf (in place when they already are float32)."""
        import torch
        import xgrammar as xgr

        row = logits if logits.dtype == torch.float32 else logits.float()
        self._matcher.fill_next_token_bitmask(self._bitmask)
        bitmask = self._bitmask.to(row.device, non_blocking=True)  # a no-op on the CPU
        xgr.apply_token_bitmask_inplace(row.unsqueeze(0), bitmask, vocab_size=self._vocab_size)
        if row.shape[-1] > self._vocab_size:  # padded logits: the padding is never a token
            row[self._vocab_size :] = -float("inf")
        if not torch.isfinite(row).any():
            raise DriverError("the response format allows no token of this model's vocabulary here")
        return row

    def accept(self, token: int) -> None:
        """Advance past ``token``; a token the grammar refuses is a driver bug (EIO)."""
        if not self._matcher.accept_token(token):
            raise DriverError(f"token {token} does not fit the response format (a driver bug)")

    def replay(self, tokens: Iterable[int]) -> None:
        """Advance past tokens generated before a preemption, as if just sampled."""
        for token in tokens:
            self.accept(token)
