"""An in-memory, exact vector index for archival memory, partitioned by namespace.

Each namespace is one partition: a contiguous float32 matrix of L2-normalised vectors
(amortised growth by half, shrinking when three quarters empty), the integer id of each row, and an
id → row map. Removal swaps the last row into the hole, so rows stay dense and a search
is one matrix-vector product over ``count`` rows followed by a partial sort.

Search is exact: cosine similarity over normalised float32 vectors. Small partitions
are scored with one pass of numpy's single-threaded einsum (about 1 ms over 10k rows of
dimension 384). Large ones (``_PREFILTER_ROWS`` rows and up) are scored first over an
int8 copy of the matrix with NumKong's SIMD kernels (a quarter of the bytes to read:
about 3 ms instead of 11 ms over 100k rows on the project's 2-core machine, where the
product is memory-bound), and then exactly: every row gets a proven upper bound on its
true score (the int8 score plus the worst rounding error of that row), the rows with the
best bounds are rescored in float32, and the answer is accepted only when its k-th exact
score beats the bound of every row left out. When it does not (near-ties around the
k-th place), the candidate set grows, and in the end the whole partition is scored in
float32. The answer is therefore always the exact top k; ``stats`` counts how often each
path ran. ``benchmarks/vindex_bench.py`` has the measurements against HNSW libraries
(approximate, and no faster here at equal recall) that led to this design.

Ids are the caller's (the SQLite rowids of the archival table). The index never
invents ids and keeps no text: the caller persists vectors and rebuilds the index at
startup with one bulk :meth:`VectorIndex.add` per namespace.

Thread-safety: every public method takes one internal lock, so the index may be used
from any number of threads; calls are serialised (a search holds the lock for its
matrix product, during which numpy releases the GIL). Results are plain Python values,
never views of the index's arrays.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Sequence

import numpy as np

try:  # NumKong: SIMD int8 dot products (a dependency; the float32 path works without it)
    import numkong as _nk
except ImportError:  # pragma: no cover - exercised only where the wheel is missing
    _nk = None

__all__ = ["VectorIndex"]

#: The smallest capacity (rows) a partition allocates.
_MIN_CAPACITY = 64
#: With a ``candidates`` filter, score just the candidate rows when they are at most this
#: fraction of the partition (gathering them is cheaper than one full pass below ~15%);
#: above it, score the whole partition and post-filter its best rows.
_GATHER_FRACTION = 0.12
#: Partitions with at least this many rows are searched through the int8 pre-filter.
_PREFILTER_ROWS = 16384
#: Added to every error bound to cover float32 rounding in the scores themselves.
_ROUNDING_MARGIN = 1e-4


class _Partition:
    """One namespace: dense rows ``[0, n)`` of ``vectors`` and ``ids``, and ``rows``."""

    __slots__ = ("codes", "ids", "n", "rows", "scale", "slack", "vectors")

    def __init__(self, dim: int) -> None:
        self.vectors = np.empty((0, dim), dtype=np.float32)
        # The int8 copy: vectors[i] ~= scale[i] * codes[i]; slack[i] is the part of row
        # i's worst-case score error that does not depend on the query (see _bound).
        self.codes = np.empty((0, dim), dtype=np.int8)
        self.scale = np.empty(0, dtype=np.float32)
        self.slack = np.empty(0, dtype=np.float32)
        self.ids = np.empty(0, dtype=np.int64)
        self.rows: dict[int, int] = {}
        self.n = 0

    def set_rows(self, targets: np.ndarray, matrix: np.ndarray, ids: np.ndarray) -> None:
        """Write normalised ``matrix`` and ``ids`` into rows ``targets`` (already reserved)."""
        self.vectors[targets] = matrix
        self.ids[targets] = ids
        codes, scale, slack = _quantize(matrix)
        self.codes[targets] = codes
        self.scale[targets] = scale
        self.slack[targets] = slack

    def reserve(self, needed: int) -> None:
        """Grow the arrays (by half at least: amortised O(1) adds) so ``needed`` rows fit."""
        capacity = len(self.ids)
        if needed <= capacity:
            return
        self._resize(max(needed, capacity + capacity // 2, _MIN_CAPACITY))

    def maybe_shrink(self) -> None:
        """Shrink the arrays to twice the rows in use when under a quarter is in use."""
        capacity = len(self.ids)
        if capacity > _MIN_CAPACITY and self.n < capacity // 4:
            self._resize(max(2 * self.n, _MIN_CAPACITY))

    def _resize(self, capacity: int) -> None:
        n = self.n
        for name in ("vectors", "codes", "scale", "slack", "ids"):
            old = getattr(self, name)
            new = np.empty((capacity, *old.shape[1:]), dtype=old.dtype)
            new[:n] = old[:n]
            setattr(self, name, new)

    def remove(self, id_: int) -> bool:
        """Swap-remove ``id_``; False if it is not here."""
        row = self.rows.pop(id_, None)
        if row is None:
            return False
        last = self.n - 1
        if row != last:
            moved = int(self.ids[last])
            for array in (self.vectors, self.codes, self.scale, self.slack, self.ids):
                array[row] = array[last]
            self.rows[moved] = row
        self.n = last
        return True

    def top(
        self, query: np.ndarray, k: int, candidates: Collection[int] | None, stats: dict[str, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The best ``k`` (ids, scores) of this partition, best first."""
        if self.n == 0:
            return _EMPTY_IDS, _EMPTY_SCORES
        if candidates is not None:
            stats["filtered"] += 1
        if candidates is None and self.n >= _PREFILTER_ROWS and _nk is not None:
            found = self.prefiltered_top(query, k)
            stats["prefiltered" if found is not None else "fallback"] += 1
            if found is not None:
                return found
            scores = _scores(self.vectors[: self.n], query)
            ids = self.ids[: self.n]
        elif candidates is None:
            stats["float32"] += 1
            scores = _scores(self.vectors[: self.n], query)
            ids = self.ids[: self.n]
        elif len(candidates) <= _GATHER_FRACTION * self.n:
            # Few candidates: find their rows (dict lookups) and score only those rows.
            rows_of = self.rows
            found = [r for r in map(rows_of.get, candidates) if r is not None]
            if not found:
                return _EMPTY_IDS, _EMPTY_SCORES
            rows = np.array(found, dtype=np.intp)
            scores = _scores(self.vectors[rows], query)
            ids = self.ids[rows]
        else:
            # Many candidates: one full pass, then post-filter a generous top list; when
            # that keeps fewer than k, mask the full scores (exact either way).
            scores = _scores(self.vectors[: self.n], query)
            ids = self.ids[: self.n]
            allowed = candidates if isinstance(candidates, set | frozenset) else set(candidates)
            wide = min(self.n, max(4 * k, int(2 * k * self.n / max(1, len(candidates)))))
            top_ids, top_scores = _best(ids, scores, wide)
            keep = [j for j, id_ in enumerate(top_ids.tolist()) if id_ in allowed]
            if len(keep) >= k or wide == self.n:
                return top_ids[keep][:k], top_scores[keep][:k]
            rows_of = self.rows
            mask = np.zeros(self.n, dtype=bool)
            mask[[r for r in map(rows_of.get, allowed) if r is not None]] = True
            scores, ids = scores[mask], ids[mask]
        return _best(ids, scores, k)

    def prefiltered_top(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The exact best ``k`` via the int8 copy and per-row error bounds, or None.

        None means the bounds could not prove the answer with up to a quarter of the rows
        rescored (many near-ties): the caller then scores every row in float32.
        """
        n = self.n
        assert _nk is not None
        q_scale = float(np.abs(query).max()) / 127.0
        q_codes = np.rint(query / q_scale).astype(np.int8)
        raw = np.asarray(
            _nk.cdist(q_codes[None, :], self.codes[:n], metric="dot", out_dtype="float32")
        )
        scale = self.scale[:n]
        # upper[i] >= the true score of row i (see _quantize for the bound).
        bound = scale * (q_scale * (0.5 * float(np.abs(q_codes.astype(np.int32)).sum())))
        bound += q_scale * self.slack[:n]
        bound += _ROUNDING_MARGIN
        upper = raw.reshape(-1) * scale
        upper *= q_scale
        upper += bound
        wanted = max(256, 8 * k)
        while wanted < n // 4:
            part = np.argpartition(-upper, wanted)[: wanted + 1]
            # The largest bound among rows left out is at most the smallest bound kept.
            order = np.argsort(-upper[part], kind="stable")
            part = part[order]
            kept, cutoff = part[:wanted], float(upper[part[wanted]])
            exact = _scores(self.vectors[kept], query)
            ids, scores = _best(self.ids[kept], exact, k)
            if len(scores) == k and float(scores[-1]) > cutoff:
                return ids, scores
            wanted *= 4
        return None


def _quantize(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row symmetric int8 codes of ``matrix``, their scales, and each row's slack.

    With ``v = s (c + e)`` (``|e| <= 1/2`` per component) and a query ``q = t (d + f)``
    quantized the same way, ``q.v - s t (d.c) = s t (d.e + f.c + f.e)``, whose size is at
    most ``s t (|d|_1 / 2 + |c|_1 / 2 + dim / 4)``. ``slack`` is ``s (|c|_1 / 2 + dim / 4)``;
    the query's part is added at search time.
    """
    peak = np.abs(matrix).max(axis=1)
    scale = (peak / 127.0).astype(np.float32)
    codes = np.rint(matrix / scale[:, None]).astype(np.int8)
    l1 = np.abs(codes.astype(np.int32)).sum(axis=1).astype(np.float32)
    slack = (scale * (0.5 * l1 + matrix.shape[1] / 4.0)).astype(np.float32)
    return codes, scale, slack


_EMPTY_IDS = np.empty(0, dtype=np.int64)
_EMPTY_SCORES = np.empty(0, dtype=np.float32)


def _scores(matrix: np.ndarray, query: np.ndarray) -> np.ndarray:
    """``matrix @ query`` with numpy's own single-threaded SIMD loop.

    Not BLAS: OpenBLAS runs a matrix-vector product of this size on every core with
    spinning threads, which on a 2-core machine that is busy (the LLM driver decoding)
    measured 8-15x slower at 10k rows than one thread; the product is memory-bound, so
    one thread loses nothing when the machine is idle either (benchmarks/vindex_bench.py).
    """
    return np.einsum("ij,j->i", matrix, query)


def _best(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` highest ``scores`` (and their ids), highest first, ties by id."""
    if k < len(scores):
        part = np.argpartition(-scores, k - 1)[:k]
        ids, scores = ids[part], scores[part]
    order = np.lexsort((ids, -scores))
    return ids[order], scores[order]


class VectorIndex:
    """Exact cosine search over float32 vectors, partitioned by namespace.

    Args:
        dim: the vectors' dimension (384 for all-MiniLM-L6-v2).

    Every method is thread-safe (one internal lock). Namespaces are created by the
    first :meth:`add` to them and disappear when emptied or dropped.
    """

    def __init__(self, dim: int = 384) -> None:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"The index dimension must be a positive integer, not {dim!r}.")
        self._dim = dim
        self._parts: dict[str, _Partition] = {}
        self._lock = threading.Lock()
        #: How many partition searches took each path (float32 scan, int8 pre-filter
        #: proven exact, pre-filter that fell back to a float32 scan, candidate filter).
        self.stats: dict[str, int] = {"float32": 0, "prefiltered": 0, "fallback": 0, "filtered": 0}

    @property
    def dim(self) -> int:
        """The dimension every vector and query must have."""
        return self._dim

    # -- updates

    def add(self, namespace: str, ids: Sequence[int], vectors: np.ndarray) -> None:
        """Add (or replace) ``ids[i]`` → ``vectors[i]`` in ``namespace``.

        ``vectors`` has shape ``(len(ids), dim)``; it is copied and L2-normalised, so it
        need not be normalised already. An id already in the namespace gets its vector
        replaced; if an id repeats within one call the last vector wins. Raises
        ValueError (and changes nothing) for a wrong shape, a non-finite or zero vector,
        or non-integer ids.
        """
        _check_namespace(namespace)
        id_array = _as_ids(ids)
        matrix = self._as_matrix(vectors, len(id_array))
        if len(id_array) == 0:
            return
        with self._lock:
            part = self._parts.get(namespace)
            if part is None:
                part = self._parts[namespace] = _Partition(self._dim)
            id_list = id_array.tolist()
            if len(set(id_list)) != len(id_list):
                # Keep the last occurrence of each id.
                last = {id_: j for j, id_ in enumerate(id_list)}
                keep = np.fromiter(sorted(last.values()), dtype=np.intp, count=len(last))
                id_array, matrix = id_array[keep], matrix[keep]
                id_list = id_array.tolist()
            rows_of = part.rows
            targets = np.empty(len(id_list), dtype=np.intp)
            n = part.n
            new_rows: list[tuple[int, int]] = []
            for j, id_ in enumerate(id_list):
                row = rows_of.get(id_)
                if row is None:
                    row = n
                    n += 1
                    new_rows.append((id_, row))
                targets[j] = row
            part.reserve(n)
            part.set_rows(targets, matrix, id_array)
            rows_of.update(new_rows)
            part.n = n

    def remove(self, namespace: str, ids: Sequence[int]) -> None:
        """Remove ``ids`` from ``namespace``; ids (or a namespace) not present are ignored."""
        _check_namespace(namespace)
        id_list = _as_ids(ids).tolist()
        with self._lock:
            part = self._parts.get(namespace)
            if part is None:
                return
            for id_ in id_list:
                part.remove(id_)
            if part.n == 0:
                del self._parts[namespace]
            else:
                part.maybe_shrink()

    def drop(self, namespace: str) -> None:
        """Forget ``namespace`` and every vector in it (nothing happens if it is absent)."""
        _check_namespace(namespace)
        with self._lock:
            self._parts.pop(namespace, None)

    # -- queries

    def search(
        self,
        namespaces: Sequence[str],
        query: np.ndarray,
        k: int,
        candidates: Collection[int] | None = None,
    ) -> list[tuple[int, str, float]]:
        """The ``k`` entries of ``namespaces`` most similar to ``query``.

        Returns ``(id, namespace, cosine)`` tuples, best first (ties by id), at most
        ``k`` of them (fewer when the namespaces hold fewer). ``query`` has shape
        ``(dim,)`` (or ``(1, dim)``) and is normalised here. ``candidates``, when given,
        restricts the search to those ids (a metadata pre-filter); ids in it that are not
        in the namespaces are ignored. Unknown namespaces are empty. Raises ValueError
        for a wrong query shape, a non-finite or zero query, or ``k < 1``.
        """
        if isinstance(namespaces, str):
            raise ValueError(
                "namespaces must be a sequence of namespace names, not a single string: "
                f"pass [{namespaces!r}]."
            )
        for namespace in namespaces:
            _check_namespace(namespace)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, not {k!r}.")
        q = self._as_query(query)
        with self._lock:
            parts = [(ns, self._parts[ns]) for ns in dict.fromkeys(namespaces) if ns in self._parts]
            if len(parts) == 1:
                ns, part = parts[0]
                ids, scores = part.top(q, k, candidates, self.stats)
                return [(i, ns, s) for i, s in zip(ids.tolist(), scores.tolist(), strict=True)]
            found: list[tuple[float, int, str]] = []
            for ns, part in parts:
                ids, scores = part.top(q, k, candidates, self.stats)
                found.extend(zip(scores.tolist(), ids.tolist(), [ns] * len(ids), strict=True))
        found.sort(key=lambda t: (-t[0], t[1], t[2]))
        return [(i, ns, s) for s, i, ns in found[:k]]

    def count(self, namespace: str | None = None) -> int:
        """Vectors in ``namespace`` (0 if absent), or in all namespaces when None."""
        with self._lock:
            if namespace is None:
                return sum(p.n for p in self._parts.values())
            part = self._parts.get(namespace)
            return 0 if part is None else part.n

    def namespaces(self) -> list[str]:
        """The namespaces that hold at least one vector, sorted."""
        with self._lock:
            return sorted(self._parts)

    def __contains__(self, key: tuple[str, int]) -> bool:
        """``(namespace, id) in index``."""
        namespace, id_ = key
        with self._lock:
            part = self._parts.get(namespace)
            return part is not None and int(id_) in part.rows

    def nbytes(self) -> int:
        """Bytes held by the vector and id arrays (capacity included; not the id maps)."""
        with self._lock:
            return sum(
                p.vectors.nbytes + p.codes.nbytes + p.scale.nbytes + p.slack.nbytes + p.ids.nbytes
                for p in self._parts.values()
            )

    # -- validation

    def _as_matrix(self, vectors: np.ndarray, n: int) -> np.ndarray:
        """``vectors`` as a fresh, row-normalised float32 (n, dim) array, or ValueError."""
        array = np.asarray(vectors)
        if array.ndim == 1 and n == 1:
            array = array[None, :]
        if array.ndim != 2 or array.shape != (n, self._dim):
            raise ValueError(
                f"vectors has shape {array.shape}; expected ({n}, {self._dim}): one row of "
                f"{self._dim} numbers per id."
            )
        if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
            raise ValueError(f"vectors must be real numbers, not {array.dtype}.")
        matrix = np.array(array, dtype=np.float32, order="C", copy=True)
        if not np.isfinite(matrix).all():
            raise ValueError("vectors contain NaN or infinite values.")
        norms = np.linalg.norm(matrix, axis=1)
        if n and not (norms > 0).all():
            raise ValueError("vectors contain an all-zero row, which has no direction.")
        matrix /= norms[:, None]
        return matrix

    def _as_query(self, query: np.ndarray) -> np.ndarray:
        """``query`` as a normalised float32 (dim,) vector, or ValueError."""
        array = np.asarray(query)
        if array.ndim == 2 and array.shape[0] == 1:
            array = array[0]
        if array.shape != (self._dim,):
            raise ValueError(
                f"query has shape {array.shape}; expected ({self._dim},): one vector of "
                f"{self._dim} numbers."
            )
        if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
            raise ValueError(f"query must be real numbers, not {array.dtype}.")
        q = np.array(array, dtype=np.float32, copy=True)
        if not np.isfinite(q).all():
            raise ValueError("query contains NaN or infinite values.")
        norm = float(np.linalg.norm(q))
        if norm == 0.0:
            raise ValueError("query is an all-zero vector, which has no direction.")
        q /= norm
        return q


def _check_namespace(namespace: object) -> None:
    if not isinstance(namespace, str):
        raise ValueError(f"A namespace must be a string, not {type(namespace).__name__}.")


def _as_ids(ids: Sequence[int]) -> np.ndarray:
    """``ids`` as a 1-D int64 array, or ValueError."""
    if isinstance(ids, str | bytes):
        raise ValueError("ids must be a sequence of integers, not a string.")
    array = np.asarray(ids)
    if array.size == 0:
        return np.empty(0, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError(f"ids must be a flat sequence of integers, not shape {array.shape}.")
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"ids must be integers, not {array.dtype}.")
    return array.astype(np.int64, copy=False)
