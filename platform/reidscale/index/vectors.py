"""Refuse vectors FAISS would answer wrongly without a word.

A NaN vector added to a gallery is never found again and a NaN query gets no hits;
an inf query scores arbitrary rows inf; a zero vector has no direction, so under
inner product / cosine its scores are all 0 and its rank is noise. Every entry point
that takes vectors (build, ``Gallery.add``, ``search``, ``search_identities``) calls
``check_vectors`` first and fails with one line naming the rows.
"""

from __future__ import annotations

import numpy as np

CHUNK = 1 << 16
# a norm this small is not a direction (L2-normalised embeddings have norm 1)
MIN_NORM = 1e-6


def _rows(bad: np.ndarray, what: str, problem: str) -> str:
    first = ", ".join(str(int(i)) for i in bad[:5])
    more = f", ... ({len(bad)} rows)" if len(bad) > 5 else f" ({len(bad)} row{'s' if len(bad) > 1 else ''})"
    return f"{what}: row {first}{more} {problem}"


def check_vectors(vectors: np.ndarray, what: str, metric: str = "ip", *, lo: int = 0, hi: int | None = None) -> None:
    """Raise ``ValueError`` if any row is non-finite, or has (near) zero norm under metric ``ip``.

    Works in chunks, so ``vectors`` may be a memory-mapped N×D array (or an ``index.rows``
    source) of any size; ``lo:hi`` checks only those rows (named by their position in ``vectors``).
    ``what`` names the input in the message ("gallery vectors from g.npy", "queries").
    """
    bad_finite, bad_norm = [], []
    hi = len(vectors) if hi is None else hi
    for start in range(lo, hi, CHUNK):
        x = np.asarray(vectors[start : min(start + CHUNK, hi)], dtype=np.float32)
        finite = np.isfinite(x).all(axis=1)
        bad_finite.append(np.flatnonzero(~finite) + start)
        if metric == "ip":
            with np.errstate(over="ignore", invalid="ignore"):
                norm = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
            bad_norm.append(np.flatnonzero(finite & (norm < MIN_NORM)) + start)
    bad = np.concatenate(bad_finite) if bad_finite else np.zeros(0, np.int64)
    if len(bad):
        raise ValueError(_rows(bad, what, "not finite (NaN or inf); refusing them"))
    bad = np.concatenate(bad_norm) if bad_norm else np.zeros(0, np.int64)
    if len(bad):
        raise ValueError(_rows(bad, what, f"zero norm (< {MIN_NORM:g}): no direction for metric ip (cosine); "
                                          "refusing them"))
