"""The CPU driver: a transformers causal LM driven step by step on one engine thread.

Shape (after vLLM's engine core, scaled down to one thread):

* :class:`CpuDriver` is the front end on the kernel's asyncio loop. It never runs
  model code; it submits :class:`_Sequence` objects and reads :class:`Delta` items
  from a per-request ``asyncio.Queue``.
* :class:`_Engine` owns the model on one dedicated thread. Each *step* it takes in new
  requests and aborts, admits waiting sequences into free slots, feeds one prefill
  chunk to each sequence still reading its prompt (own KV cache), and advances every
  decoding sequence by one token in ONE batched forward pass (:class:`_DecodeBatch`:
  the decoding sequences' caches merged, left-padded, re-laid out only when one joins
  or leaves). Aborts therefore land within one step.
* Deltas go back through an :class:`~drivers.base.Outbox` flushed once per step: one
  ``loop.call_soon_threadsafe`` per step, not per token, so the loop never waits on
  torch and wakes once per step however many sequences decode.
* Structured output (``response_format``): the front end compiles the format's grammar
  on a worker thread before submitting (``drivers.grammar``, cached per format), so a
  slow compile never holds the engine; each constrained sequence then has its own
  matcher, which masks that sequence's logits before sampling, in the batched step too.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from drivers.base import (
    Consumer,
    Delta,
    DriverError,
    FinishReason,
    GenerationRequest,
    Outbox,
    Progress,
    ResponseFormat,
    SamplingOptions,
    relay,
)
from drivers.grammar import Constraint, GrammarCache
from drivers.stream import check_room
from drivers.text import Detokenizer as _Detokenizer
from drivers.text import PromptEncoder as _PromptEncoder
from drivers.text import StopText as _StopText
from drivers.text import TokenizingDriver, hub_offline
from drivers.text import resolve_model_dir as _resolve_model_dir

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

#: Prompt tokens fed per engine step: bounds how long one long prompt holds the engine
#: (and delays everyone's next token). bf16 matmuls on an AVX2-only CPU run ~150 tok/s
#: of prefill for SmolLM2, so 256 tokens is about 1.5 s there, 0.3 s in fp32.
PREFILL_CHUNK = 256
_DTYPES = ("bfloat16", "float32", "float16")


# --------------------------------------------------------------------------- requests


class SeqStatus(enum.IntEnum):
    """Life of a sequence on the engine; every status from FINISHED_STOPPED on is final."""

    WAITING = 0
    PREFILLING = 1
    DECODING = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FAILED = 6

    def is_finished(self) -> bool:
        """True once the sequence has left the engine."""
        return self >= SeqStatus.FINISHED_STOPPED


_FINISH_REASONS: dict[SeqStatus, FinishReason] = {
    SeqStatus.FINISHED_STOPPED: "stop",
    SeqStatus.FINISHED_LENGTH: "length",
    SeqStatus.FINISHED_ABORTED: "abort",
}

#: What the engine hands a request's consumer: a delta, or the error that ends it.
_Item = Delta | DriverError


def _sample(logits: torch.Tensor, options: SamplingOptions, rng: torch.Generator | None) -> int:
    """Pick the next token from one position's logits: greedy, or temperature + top-p."""
    import torch

    if options.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / options.temperature, dim=-1)
    if options.top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=rng))
    sorted_probs, order = torch.sort(probs, descending=True)
    # Keep the smallest head of the distribution whose mass reaches top_p (at least one).
    outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= options.top_p
    outside[0] = False  # top_p <= 0 degrades to greedy instead of an empty distribution
    sorted_probs[outside] = 0.0
    return int(order[torch.multinomial(sorted_probs, 1, generator=rng)])


@dataclass(eq=False)
class _Sequence:
    """One request on the engine. After submission only the engine thread touches it."""

    request: GenerationRequest
    sink: Consumer
    arrival: int
    status: SeqStatus = SeqStatus.WAITING
    prompt_ids: list[int] = field(default_factory=list)
    #: Tokens not yet fed to the model: the prompt's rest, then the last sampled token.
    pending: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    #: Sampled ids not yet sent in a delta (sent with the next text or the finish).
    unsent_ids: list[int] = field(default_factory=list)
    cache: Any = None  # this sequence's transformers Cache while it is running
    rng: torch.Generator | None = None
    detok: _Detokenizer | None = None
    stop_text: _StopText | None = None
    #: The consumer's loop is gone: finish quietly at the next step.
    orphaned: bool = False
    #: Prompt/resumed tokens whose KV came from the prefix cache.
    cached_tokens: int = 0
    #: The compiled grammar of the request's response format (None: free text), and the
    #: sequence's matcher over it once it runs.
    grammar: Any = None
    constraint: Constraint | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def options(self) -> SamplingOptions:
        return self.request.sampling

    def delta(self, text: str, finish: FinishReason | None = None) -> Delta:
        """A delta carrying ``text`` and every sampled id not sent yet."""
        ids, self.unsent_ids = self.unsent_ids, []
        return Delta(
            text, ids, len(self.prompt_ids), len(self.output_ids), finish, self.cached_tokens
        )


# --------------------------------------------------------------------------- model


@dataclass
class _LoadedModel:
    """A model and tokenizer ready for the engine."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    eos_ids: frozenset[int]
    max_context: int
    #: Width of the model's logits (may exceed the tokenizer's vocabulary).
    vocab_size: int


def _load_model(model: str | None, dtype: str, progress: Progress) -> _LoadedModel:
    """Load tokenizer and weights from local files only (blocking; run off the loop)."""
    hub_offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _resolve_model_dir(model, progress)
    progress(f"Loading {path.name}", 0.9 if model is None else 0.1)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        net = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype), local_files_only=True
        )
    except Exception as exc:
        raise DriverError(
            f"Could not load a causal language model from {path}: {exc}. Check that the "
            f"folder holds a complete transformers checkpoint (config.json, weights, "
            f"tokenizer files)."
        ) from exc
    net.eval()
    progress(f"Loaded {path.name}", 1.0)
    return _LoadedModel(
        model=net,
        tokenizer=tokenizer,
        eos_ids=_eos_ids(net, tokenizer),
        max_context=int(getattr(net.config, "max_position_embeddings", 2048)),
        vocab_size=int(net.get_output_embeddings().weight.shape[0]),
    )


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Every id that ends a generation: generation_config's EOS plus the tokenizer's."""
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


# --------------------------------------------------------------------------- batching


class _DecodeBatch:
    """The KV caches of all decoding sequences merged into one left-padded batch.

    Row ``i`` belongs to ``_seqs[i]``; its first ``_pads[i]`` cache columns are padding,
    masked out of attention, so every row ends at the same column and one forward pass
    advances all rows by one token. The layout is rebuilt only when a sequence joins
    (bringing the cache of its solo prefill) or leaves.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        self._model = model
        self._seqs: list[_Sequence] = []
        self._pads: list[int] = []
        self._cache: Any = None

    @staticmethod
    def supports(model: PreTrainedModel) -> bool:
        """Only plain full-attention caches can be padded and merged this way (sliding-window
        or recurrent layers would need their own bookkeeping)."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        layers = DynamicCache(config=model.config).layers
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    def clear(self) -> None:
        self._seqs, self._pads, self._cache = [], [], None

    def forward(self, seqs: list[_Sequence]) -> torch.Tensor:
        """Feed each sequence's last sampled token; return next-token logits, one row each."""
        import torch

        if [id(s) for s in seqs] != [id(s) for s in self._seqs]:
            self._relayout(seqs)
        length = self._cache.get_seq_length()
        pads = torch.tensor(self._pads)
        out = self._model(
            input_ids=torch.tensor([s.pending[-1:] for s in seqs]),
            attention_mask=self._padding_mask(pads, length + 1),
            # Each row continues from its own length, not from the padded width.
            position_ids=(length - pads).unsqueeze(1),
            past_key_values=self._cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self._cache = out.past_key_values
        return out.logits[:, -1]

    def _padding_mask(self, pads: torch.Tensor, width: int) -> torch.Tensor:
        """Additive [batch, 1, 1, width] mask hiding each row's left padding (eager and
        sdpa attention both accept this form, and transformers uses a 4D mask as is)."""
        import torch

        dtype = self._model.dtype
        hidden = torch.arange(width).unsqueeze(0) < pads.unsqueeze(1)
        mask = torch.zeros(hidden.shape, dtype=dtype).masked_fill(hidden, torch.finfo(dtype).min)
        return mask[:, None, None, :]

    def _relayout(self, seqs: list[_Sequence]) -> None:
        """Rebuild the merged cache for ``seqs``: keep rows of members that stay, take the
        solo cache of newcomers, right-align every row to the longest."""
        from transformers import DynamicCache

        rows = [self._row_kv(seq) for seq in seqs]
        width = max(keys[0].shape[-2] for keys, _ in rows)
        merged = []
        for layer in range(len(rows[0][0])):
            merged.append(
                (
                    self._stack([k[layer] for k, _ in rows], width),
                    self._stack([v[layer] for _, v in rows], width),
                )
            )
        self._cache = DynamicCache(ddp_cache_data=merged)
        self._pads = [width - keys[0].shape[-2] for keys, _ in rows]
        self._seqs = list(seqs)
        for seq in seqs:
            seq.cache = None  # the batch owns the KV now

    def row_kv(self, seq: _Sequence) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """A member's unpadded per-layer keys and values (views), or None if not a member."""
        if self._cache is None or not any(member is seq for member in self._seqs):
            return None
        return self._row_kv(seq)

    def _row_kv(self, seq: _Sequence) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One sequence's per-layer keys and values without padding, each [1, H, L, D]."""
        for row, member in enumerate(self._seqs):
            if member is seq:
                pad = self._pads[row]
                layers = self._cache.layers
                return (
                    [lay.keys[row : row + 1, :, pad:] for lay in layers],
                    [lay.values[row : row + 1, :, pad:] for lay in layers],
                )
        layers = seq.cache.layers
        return [lay.keys for lay in layers], [lay.values for lay in layers]

    @staticmethod
    def _stack(rows: list[torch.Tensor], width: int) -> torch.Tensor:
        """Stack [1, H, L_i, D] rows into [B, H, width, D], each right-aligned (left padding)."""
        first = rows[0]
        out = first.new_zeros((len(rows), first.shape[1], width, first.shape[3]))
        for i, row in enumerate(rows):
            out[i, :, width - row.shape[-2] :] = row[0]
        return out


class _PrefixStore:
    """KV caches of finished and preempted sequences, keyed by the tokens they cover.

    A new sequence whose tokens start with a stored entry's (a preempted generation
    resuming, or the next turn of a conversation) takes that entry's cache, cropped to
    the common prefix, and prefills only the rest. Entries are taken, not copied (the
    new sequence extends the cache in place), and the least recently stored go first
    when the token budget is exceeded. Engine thread only.
    """

    #: Shorter common prefixes are not worth the bookkeeping.
    MIN_REUSE = 8

    def __init__(self, budget_tokens: int) -> None:
        self.budget = budget_tokens
        self._entries: list[tuple[list[int], list[Any], list[Any]]] = []  # oldest first
        self.hits = 0
        self.reused_tokens = 0

    def put(self, ids: list[int], keys: list[Any], values: list[Any]) -> None:
        if self.budget <= 0 or len(ids) < self.MIN_REUSE:
            return
        self._entries.append((ids, keys, values))
        while sum(len(e[0]) for e in self._entries) > self.budget:
            self._entries.pop(0)

    def take(self, ids: list[int]) -> tuple[int, Any] | None:
        """The longest stored common prefix with ``ids`` (at most ``len(ids) - 1`` tokens,
        so at least one token is left to feed) as ``(length, DynamicCache)``."""
        from transformers import DynamicCache

        best, best_len = -1, 0
        for i, (stored, _, _) in enumerate(self._entries):
            n = _common_prefix(stored, ids)
            if n > best_len:
                best, best_len = i, n
        best_len = min(best_len, len(ids) - 1)
        if best < 0 or best_len < self.MIN_REUSE:
            return None
        _, keys, values = self._entries.pop(best)
        layers = [
            (k[:, :, :best_len], v[:, :, :best_len]) for k, v in zip(keys, values, strict=True)
        ]
        self.hits += 1
        self.reused_tokens += best_len
        return best_len, DynamicCache(ddp_cache_data=layers)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # invariant: a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


# --------------------------------------------------------------------------- engine


class _Engine:
    """Owns the model on one thread and runs the step loop over at most ``slots`` sequences."""

    def __init__(
        self,
        loaded: _LoadedModel,
        encoder: _PromptEncoder,
        slots: int,
        threads: int | None,
        prefix_cache_tokens: int = 0,
    ) -> None:
        self._model = loaded.model
        self._tokenizer = loaded.tokenizer
        self._eos_ids = loaded.eos_ids
        self._max_context = loaded.max_context
        self._vocab_size = loaded.vocab_size
        self._encoder = encoder
        self._slots = slots
        self._threads = threads
        self._cond = threading.Condition()
        # Guarded by _cond: the hand-off between the loop and the engine thread.
        self._inbox: list[_Sequence] = []
        self._abort_ids: set[str] = set()
        self._live: dict[str, _Sequence] = {}  # submitted and not finished
        self._stopping = False
        # Engine thread only.
        self._waiting: list[_Sequence] = []
        self._running: list[_Sequence] = []
        self._batch = _DecodeBatch(self._model) if _DecodeBatch.supports(self._model) else None
        self.prefix = _PrefixStore(prefix_cache_tokens)
        self._arrivals = itertools.count()
        self._outbox = Outbox()
        #: Steps run so far (tests measure abort latency in steps, not seconds).
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name="llmos-cpu-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # -- called from the loop thread

    def submit(self, request: GenerationRequest, sink: Consumer, grammar: Any = None) -> None:
        """Queue ``request``; its deltas go to ``sink`` (handed over after each step).
        ``grammar``: its response format, compiled (None: free text)."""
        with self._cond:
            if self._stopping:
                raise DriverError("The cpu driver is shut down; load it again to generate.")
            if request.request_id in self._live:
                raise DriverError(f"Request id {request.request_id!r} is already generating.")
            seq = _Sequence(request, sink, next(self._arrivals), grammar=grammar)
            self._live[request.request_id] = seq
            self._inbox.append(seq)
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        """Ask the engine to end ``request_id`` before its next step; unknown ids are ignored."""
        with self._cond:
            if request_id in self._live:
                self._abort_ids.add(request_id)
                self._cond.notify()

    def live_ids(self) -> frozenset[str]:
        """Ids submitted and not finished yet."""
        with self._cond:
            return frozenset(self._live)

    def stop(self) -> None:
        """Stop the thread (blocking); sequences still live end with ``abort``."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    # -- engine thread

    def _run(self) -> None:
        import torch

        if self._threads:
            # Set on this thread: with OpenMP the setting follows the thread that runs the matmuls.
            torch.set_num_threads(self._threads)
        try:
            with torch.inference_mode():
                while self._take_work():
                    self._admit()
                    self._step()
                    self._flush()
                    self.steps += 1
        finally:
            # Also reached if the loop itself crashed: refuse new work, end what is live.
            with self._cond:
                self._stopping = True
                self._waiting.extend(self._inbox)
                self._inbox.clear()
            for seq in [*self._waiting, *self._running]:
                self._finish(seq, SeqStatus.FINISHED_ABORTED)
            self._flush()

    def _take_work(self) -> bool:
        """Sleep until there is work, then take new requests and aborts. False: stop."""
        with self._cond:
            while not (
                self._stopping or self._inbox or self._abort_ids or self._running or self._waiting
            ):
                self._cond.wait()
            if self._stopping:
                return False
            self._waiting.extend(self._inbox)
            self._inbox.clear()
            aborts, self._abort_ids = self._abort_ids, set()
        for seq in [*self._waiting, *self._running]:
            if seq.request_id in aborts or seq.orphaned:
                self._finish(seq, SeqStatus.FINISHED_ABORTED)
        return True

    def _admit(self) -> None:
        """Move the most urgent waiting sequences into free slots (priority, then arrival)."""
        self._waiting.sort(key=lambda s: (-s.request.priority, s.arrival))
        while self._waiting and len(self._running) < self._slots:
            seq = self._waiting.pop(0)
            self._guarded(seq, self._start)

    def _start(self, seq: _Sequence) -> None:
        """Tokenise the prompt and give the sequence its cache and sampler state."""
        import torch
        from transformers import DynamicCache

        seq.prompt_ids = self._encoder.encode(seq.request.prompt)
        check_room(len(seq.prompt_ids), len(seq.request.resume_ids), self._max_context)
        seq.cache = DynamicCache(config=self._model.config)
        seq.detok = _Detokenizer(self._tokenizer)
        seq.stop_text = _StopText(seq.options.stop)
        if seq.grammar is not None:
            seq.constraint = Constraint(seq.grammar, self._vocab_size)
        resume = list(seq.request.resume_ids)
        if resume:
            self._replay(seq, resume)
        seq.pending = [*seq.prompt_ids, *resume]
        hit = self.prefix.take(seq.pending)
        if hit is not None:  # a resumed or continued sequence: prefill only what is new
            reused, seq.cache = hit
            seq.pending = seq.pending[reused:]
            seq.cached_tokens = reused
        if seq.options.temperature > 0:
            seq.rng = torch.Generator()
            if seq.options.seed is None:
                seq.rng.seed()
            else:
                seq.rng.manual_seed(seq.options.seed)
        seq.status = SeqStatus.PREFILLING
        self._running.append(seq)
        if self._out_of_room(seq):  # max_tokens 0, or a resumed request already complete
            self._finish(seq, SeqStatus.FINISHED_LENGTH)

    def _replay(self, seq: _Sequence, resume: list[int]) -> None:
        """Resume after a preemption: count the tokens already produced as output and
        put the detokeniser and stop-string state exactly where an uninterrupted run
        would have them (their text was already delivered, so it is not sent again)."""
        assert seq.detok is not None and seq.stop_text is not None
        for token in resume:
            seq.stop_text.push(seq.detok.push(token))
        if seq.constraint is not None:  # the matcher, too, continues after the resumed tokens
            seq.constraint.replay(resume)
        seq.output_ids = list(resume)

    def _step(self) -> None:
        """One engine step: a prefill chunk for each prefilling sequence, then one token
        for each sequence that was already decoding (one batched forward pass)."""
        decoding = [s for s in self._running if s.status is SeqStatus.DECODING]
        for seq in [s for s in self._running if s.status is SeqStatus.PREFILLING]:
            self._guarded(seq, self._prefill_chunk)
        if self._batch is None:
            for seq in decoding:
                self._guarded(seq, self._decode_one)
        else:
            self._decode_batch(self._batch, decoding)

    def _decode_batch(self, batch: _DecodeBatch, seqs: list[_Sequence]) -> None:
        """Advance ``seqs`` by one token each with a single forward pass."""
        if not seqs:
            batch.clear()  # nobody decodes: do not keep their memory
            return
        try:
            logits = batch.forward(seqs)
        except Exception as exc:
            # One pass serves them all, so a failure cannot be pinned on one sequence.
            batch.clear()
            for seq in seqs:
                self._fail(seq, exc)
            return
        for seq, row in zip(seqs, logits, strict=True):
            self._guarded(seq, functools.partial(self._sample_and_accept, logits=row))

    def _prefill_chunk(self, seq: _Sequence) -> None:
        """Feed up to PREFILL_CHUNK prompt tokens; after the last one, sample the first token."""
        chunk, seq.pending = seq.pending[:PREFILL_CHUNK], seq.pending[PREFILL_CHUNK:]
        logits = self._forward(seq, chunk)
        if not seq.pending:
            seq.status = SeqStatus.DECODING
            self._sample_and_accept(seq, logits)

    def _decode_one(self, seq: _Sequence) -> None:
        """Feed the last sampled token and sample the next."""
        self._sample_and_accept(seq, self._forward(seq, seq.pending))

    def _forward(self, seq: _Sequence, ids: list[int]) -> torch.Tensor:
        """Run ``ids`` through the model on the sequence's cache; logits of the last position."""
        import torch

        out = self._model(
            input_ids=torch.tensor([ids]),
            past_key_values=seq.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        seq.cache = out.past_key_values
        return out.logits[0, -1]

    def _sample_and_accept(self, seq: _Sequence, logits: torch.Tensor) -> None:
        if seq.constraint is not None:  # only this sequence's row: others stay free
            logits = seq.constraint.mask(logits)
        self._accept(seq, _sample(logits, seq.options, seq.rng))

    def _accept(self, seq: _Sequence, token: int) -> None:
        """Record a sampled token, send its text, and finish the sequence if it is done."""
        seq.output_ids.append(token)
        seq.unsent_ids.append(token)
        seq.pending = [token]
        assert seq.detok is not None and seq.stop_text is not None
        if seq.constraint is not None:
            seq.constraint.accept(token)
        if token in self._eos_ids or (seq.constraint is not None and seq.constraint.terminated):
            self._finish(seq, SeqStatus.FINISHED_STOPPED)
            return
        text, stopped = seq.stop_text.push(seq.detok.push(token))
        if stopped:
            self._finish(seq, SeqStatus.FINISHED_STOPPED, text)
        elif self._out_of_room(seq):
            self._finish(seq, SeqStatus.FINISHED_LENGTH, text)
        elif text:
            self._send(seq, seq.delta(text))

    def _out_of_room(self, seq: _Sequence) -> bool:
        """max_tokens reached, or the next token would not fit the context window."""
        used = len(seq.prompt_ids) + len(seq.output_ids)
        return len(seq.output_ids) >= seq.options.max_tokens or used >= self._max_context

    def _finish(self, seq: _Sequence, status: SeqStatus, text: str = "") -> None:
        """End ``seq``: send its last delta and free its slot.

        Text held back as a possible stop string is released: it never became one (a
        stop string that did match has already been cut and the rest dropped).
        """
        if seq.status.is_finished():
            return
        if seq.stop_text is not None and status is not SeqStatus.FINISHED_ABORTED:
            # Held-back text is released unless the request was aborted: a preempted
            # request re-derives it from resume_ids, so sending it now would duplicate it.
            text += seq.stop_text.flush()
        seq.status = status
        self._keep_prefix(seq)
        self._release(seq)  # before the send: the consumer may reuse the id at once
        self._send(seq, seq.delta(text, _FINISH_REASONS[status]))

    def _keep_prefix(self, seq: _Sequence) -> None:
        """Store the finished sequence's KV for a later resume or next turn."""
        if self.prefix.budget <= 0 or seq.status is SeqStatus.FAILED:
            return
        kv = self._batch.row_kv(seq) if self._batch is not None else None
        if (
            kv is None
            and seq.cache is not None
            and seq.cache.layers
            and seq.cache.layers[0].keys is not None
        ):
            kv = [lay.keys for lay in seq.cache.layers], [lay.values for lay in seq.cache.layers]
        if kv is None:
            return
        keys, values = kv
        covered = keys[0].shape[-2]  # tokens fed so far: the last sampled one never was
        ids = [*seq.prompt_ids, *seq.output_ids][:covered]
        # Clone: a row of the batch is a view that would pin the whole batch's memory.
        self.prefix.put(ids, [k.clone() for k in keys], [v.clone() for v in values])

    def _fail(self, seq: _Sequence, exc: BaseException) -> None:
        """End ``seq`` with an error its consumer raises; the engine carries on."""
        if seq.status.is_finished():
            return
        seq.status = SeqStatus.FAILED
        error = (
            exc
            if isinstance(exc, DriverError)
            else DriverError(
                f"Generation failed inside the cpu driver: {type(exc).__name__}: {exc}"
            )
        )
        self._release(seq)
        self._send(seq, error)

    def _guarded(self, seq: _Sequence, work: Callable[[_Sequence], None]) -> None:
        """Run one sequence's work; an exception fails that sequence only."""
        try:
            work(seq)
        except Exception as exc:
            self._fail(seq, exc)

    def _release(self, seq: _Sequence) -> None:
        seq.cache = None
        if seq in self._running:
            self._running.remove(seq)
        if seq in self._waiting:
            self._waiting.remove(seq)
        with self._cond:
            self._live.pop(seq.request_id, None)

    def _send(self, seq: _Sequence, item: _Item) -> None:
        self._outbox.put(seq.sink, item)

    def _flush(self) -> None:
        """Hand the step's deltas over; a sequence whose consumer's loop is closed is
        orphaned (it ends at the next step)."""
        dead = self._outbox.flush()
        if dead:
            gone = set(dead)
            for seq in [*self._waiting, *self._running]:
                if seq.sink in gone:
                    seq.orphaned = True


# --------------------------------------------------------------------------- driver


class CpuDriver(TokenizingDriver):
    """Runs a transformers causal LM on the CPU, up to ``slots`` sequences at once.

    Args:
        model: a local Hugging Face model folder; None means the packaged
            SmolLM2-135M-Instruct (exported to the cache on first use).
        slots: sequences decoded at once; further requests wait in the driver.
        dtype: weight dtype: "float32" (default: on AVX2-only CPUs it prefills about 4x faster
            than bf16, which decodes about 1.3x faster), "bfloat16" or "float16".
        threads: torch intra-op threads (process-wide); None leaves torch's default.
        prefix_cache_tokens: tokens of KV kept from finished and preempted sequences so a
            resumed generation or the next turn of a conversation prefills only its new
            tokens (0 turns it off; SmolLM2 costs about 46 KB per token in float32).
    """

    name = "cpu"

    def __init__(
        self,
        model: str | None = None,
        slots: int = 4,
        dtype: str = "float32",
        threads: int | None = None,
        prefix_cache_tokens: int = 8192,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}; got {dtype!r}")
        super().__init__(model)  # _memory_bytes: the parameters' bytes, once loaded
        self._slots = slots
        self._dtype = dtype
        self._threads = threads
        self._prefix_cache_tokens = prefix_cache_tokens
        self._engine: _Engine | None = None
        self._grammars: GrammarCache | None = None

    @property
    def slots(self) -> int:
        """How many sequences this driver decodes at once."""
        return self._slots

    @property
    def steps(self) -> int:
        """Engine steps run so far (0 before load); a step advances each sequence once."""
        return self._engine.steps if self._engine else 0

    def live_request_ids(self) -> frozenset[str]:
        """Requests submitted and not yet finished (waiting or running)."""
        return self._engine.live_ids() if self._engine else frozenset()

    def prefix_stats(self) -> tuple[int, int]:
        """``(hits, tokens reused)`` of the KV prefix cache so far."""
        if self._engine is None:
            return 0, 0
        return self._engine.prefix.hits, self._engine.prefix.reused_tokens

    async def load(self, progress: Progress | None = None) -> None:
        """Load (first exporting, for the packaged model) on a worker thread.

        ``progress`` is called on the event loop. Raises :class:`DriverError` with what
        to do when the model cannot be loaded; the state is then ``failed``.
        """
        if self._state in ("ready", "loading"):
            return
        self._state, self._detail = "loading", ""
        report = self._load_progress(progress)[1]
        started = time.monotonic()
        with self._load_failures():
            loaded = await asyncio.to_thread(_load_model, self._model_arg, self._dtype, report)
        self._max_context = loaded.max_context
        self._memory_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
        self._encoder = _PromptEncoder(loaded.tokenizer)
        self._grammars = GrammarCache(loaded.tokenizer, loaded.vocab_size, loaded.eos_ids)
        self._engine = _Engine(
            loaded, self._encoder, self._slots, self._threads, self._prefix_cache_tokens
        )
        self._engine.start()
        self._state = "ready"
        self._detail = f"loaded in {time.monotonic() - started:.1f}s"

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream deltas for ``request``; the last has ``finish_reason`` and final usage.

        Stopping iteration early (``aclose``, cancellation) aborts the request.
        Raises :class:`DriverError` if the request fails.
        """
        engine = self._ready()[0]
        fmt = request.sampling.response_format
        # Compiled here, off the engine thread: a slow grammar never holds other sequences.
        grammar = await self._grammar_cache().compile_async(fmt) if fmt is not None else None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        engine.submit(request, Consumer(loop, queue), grammar)
        async with contextlib.aclosing(
            relay(queue, lambda: engine.abort(request.request_id))
        ) as deltas:
            async for delta in deltas:
                yield delta

    async def prepare_format(self, response_format: ResponseFormat) -> None:
        """Compile ``response_format`` for this model (cached), on a worker thread.
        Raises :class:`FormatError` saying what is wrong with an invalid one."""
        await self._grammar_cache().compile_async(response_format)

    def grammar_compiles(self) -> int:
        """Grammars compiled so far (each distinct format once, while it stays cached)."""
        return self._grammars.compiles if self._grammars is not None else 0

    def abort(self, request_id: str) -> None:
        """End ``request_id`` before its next step (stream ends with ``abort``)."""
        if self._engine is not None:
            self._engine.abort(request_id)

    async def shutdown(self) -> None:
        """Stop the engine thread (live requests end with ``abort``) and drop the model."""
        engine, self._engine, self._encoder = self._engine, None, None
        self._grammars = None
        if engine is not None:
            await asyncio.to_thread(engine.stop)
        self._state, self._detail, self._memory_bytes = "unloaded", "", None

    def _grammar_cache(self) -> GrammarCache:
        self._ready()
        assert self._grammars is not None
        return self._grammars

    def _ready(self) -> tuple[_Engine, _PromptEncoder]:
        if self._engine is None or self._encoder is None or self._state != "ready":
            raise self._not_ready()
        return self._engine, self._encoder
