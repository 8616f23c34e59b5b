"""Identity-structured embedding galleries of controllable difficulty, for index tests and benchmarks.

Unlike ``bench/index_scale.py``'s first generator (one spectrum, one spread, no
distractors), each ``EmbeddingDistribution`` sets what makes approximate search hard:

* ``effective_dim``: the participation ratio (sum λ)² / sum λ² of the identity centres'
  covariance spectrum λ_k ∝ k^-decay (decay found by bisection). ~6 is the old bench
  (one direction carries ~40% of the variance); ~50 is what issue 13 measured on real
  features that defeated ``nprobe = max(16, nlist/64)``; near ``dim`` is isotropic.
* ``spread_sigma``: per-identity noise norms are log-normal around ``noise`` (0: all
  identities equally tight), so some identities are compact and some diffuse.
* ``tail_alpha``: images per identity are 1 + Pareto(tail_alpha)·``median_images`` (capped),
  a long tail of a few identities with very many images.
* ``distractor_fraction``: rows of identity -1, each a lone image of its own random centre.

Vectors are float32 and L2-normalised. Queries are further images of gallery identities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DISTRIBUTIONS", "EmbeddingDistribution", "generate", "participation_ratio", "spectrum"]


@dataclass(frozen=True)
class EmbeddingDistribution:
    name: str
    effective_dim: float
    noise: float = 0.6
    spread_sigma: float = 0.35
    tail_alpha: float = 1.5
    median_images: float = 3.0
    max_images: int = 300
    distractor_fraction: float = 0.2


# The bench's and the tests' distributions: low to high effective dimension, all with
# heterogeneous spread, long tails and 20% distractors.
DISTRIBUTIONS = {
    "lowdim": EmbeddingDistribution("lowdim", effective_dim=6),
    "middim": EmbeddingDistribution("middim", effective_dim=50),
    "highdim": EmbeddingDistribution("highdim", effective_dim=200),
}


def participation_ratio(variances: np.ndarray) -> float:
    return float(variances.sum() ** 2 / (variances**2).sum())


def spectrum(dim: int, effective_dim: float) -> np.ndarray:
    """Variances λ_k ∝ k^-decay (sum 1) whose participation ratio is ``effective_dim`` (clipped to [1, dim])."""
    k = np.arange(1, dim + 1, dtype=np.float64)
    target = min(max(effective_dim, 1.0), float(dim))
    lo, hi = 0.0, 8.0  # decay 0 → ratio dim; decay 8 → ratio ~1
    for _ in range(60):  # the ratio falls monotonically with the decay
        mid = (lo + hi) / 2
        if participation_ratio(k**-mid) > target:
            lo = mid
        else:
            hi = mid
    lam = k ** -((lo + hi) / 2)
    return lam / lam.sum()


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def generate(dist: EmbeddingDistribution, n: int, dim: int, n_queries: int = 0, seed: int = 0,
             out: np.ndarray | None = None, chunk: int = 1 << 16):
    """(gallery N×D, identity N, queries Q×D, query identity Q); identity -1 marks a distractor.

    ``out`` (e.g. an ``np.lib.format.open_memmap``) receives the gallery in chunks instead
    of a new array, so a 1M gallery needs no second copy in memory.
    """
    rng = np.random.default_rng(seed)
    n_distract = int(round(dist.distractor_fraction * n))
    n_real = n - n_distract
    counts = np.minimum(1 + np.floor(rng.pareto(dist.tail_alpha, n_real + 1) * dist.median_images),
                        dist.max_images).astype(np.int64)
    n_ids = int(np.searchsorted(np.cumsum(counts), n_real)) + 1
    counts = counts[:n_ids]
    counts[-1] -= counts.sum() - n_real
    identity = np.concatenate([np.repeat(np.arange(n_ids, dtype=np.int64), counts),
                               np.full(n_distract, -1, np.int64)])
    identity = identity[rng.permutation(n)]  # distractors and identities interleaved, as in a real gallery
    std = np.sqrt(spectrum(dim, dist.effective_dim)).astype(np.float32)
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)).astype(np.float32))
    centres = _unit((rng.standard_normal((n_ids, dim), dtype=np.float32) * std) @ rotation.T)
    spread = (dist.noise * np.exp(dist.spread_sigma * rng.standard_normal(n_ids))).astype(np.float32)

    def images(idents: np.ndarray, target: np.ndarray) -> None:
        for lo in range(0, len(idents), chunk):
            ident = idents[lo : lo + chunk]
            real = ident >= 0
            base = np.empty((len(ident), dim), np.float32)
            base[real] = centres[ident[real]]
            # a distractor is a lone image of a centre of its own, drawn like an identity's
            base[~real] = _unit((rng.standard_normal((int((~real).sum()), dim), dtype=np.float32) * std) @ rotation.T)
            scale = np.where(real, spread[np.maximum(ident, 0)], dist.noise).astype(np.float32)
            x = base + rng.standard_normal((len(ident), dim), dtype=np.float32) * (scale / np.sqrt(dim))[:, None]
            target[lo : lo + chunk] = _unit(x)

    gallery = np.empty((n, dim), np.float32) if out is None else out
    images(identity, gallery)
    q_ident = rng.choice(n_ids, min(n_queries, n_ids), replace=False).astype(np.int64)
    queries = np.empty((len(q_ident), dim), np.float32)
    images(q_ident, queries)
    return gallery, identity, queries, q_ident
