"""The search job: query images, a query split or query vectors → top-k identities with distances."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from reidscale.config import ConfigError
from reidscale.data.shards import atomic_write_json


@dataclass
class SearchJobConfig:
    # a built index directory (holds manifest.json)
    index_dir: str = ""
    # query image files (`images=a.jpg,b.jpg`) ...
    images: list[str] = field(default_factory=list)
    # camera id of each query image (`cameras=0,3`), for a model trained with SIE
    cameras: list[int] = field(default_factory=list)
    # ... or a split of a prepared dataset (`data_dir=runs/demo/data split=query`) ...
    data_dir: str = ""
    split: str = ""
    # ... or precomputed query vectors, an N×D float32 .npy
    vectors: str = ""
    k: int = 10
    # true: the k best distinct identities (each with its best image); false: the k best images
    distinct_identities: bool = True
    # embedding model for images/split; empty: the model_dir recorded in the index manifest
    model_dir: str = ""
    format: Literal["table", "json"] = "table"
    # also write the JSON result here
    out: str = ""

    def validate(self) -> None:
        if not self.index_dir:
            raise ConfigError("index_dir: required (a directory built by jobs/build_index.py)")
        given = [bool(self.images), bool(self.split or self.data_dir), bool(self.vectors)]
        if sum(given) != 1:
            raise ConfigError("images, data_dir+split, vectors: give exactly one source of queries")
        if (self.split or self.data_dir) and not (self.split and self.data_dir):
            raise ConfigError("split: a dataset query needs both data_dir and split")
        if self.k < 1:
            raise ConfigError("k: must be >= 1")
        if self.cameras and len(self.cameras) != len(self.images):
            raise ConfigError(f"cameras: {len(self.cameras)} ids for {len(self.images)} images; give one per image")
        for name in ("index_dir", "vectors", "data_dir"):
            value = getattr(self, name)
            if value and not Path(value).exists():
                raise ConfigError(f"{name}: {value} does not exist")


def distances(scores: np.ndarray, metric: str) -> np.ndarray:
    """Scores as distances: cosine distance 1 - s for ip, Euclidean sqrt(s) for l2 (squared L2)."""
    if metric == "ip":
        return 1.0 - scores
    return np.sqrt(np.maximum(scores, 0.0))


def _queries(cfg: SearchJobConfig, gallery) -> tuple[np.ndarray, list, list]:
    """(vectors, labels naming each query, true identity or None per query)."""
    if cfg.vectors:
        vectors = np.load(cfg.vectors)
        return vectors, [f"{Path(cfg.vectors).name}[{i}]" for i in range(len(vectors))], [None] * len(vectors)
    from reidscale.embed import embed_images, embed_split_in_process

    model_dir = gallery._model_dir(cfg.model_dir or None)
    if cfg.images:
        vectors, ok = embed_images(model_dir, cfg.images, cameras=cfg.cameras or None)
        if not ok.all():
            bad = [cfg.images[i] for i in np.flatnonzero(~ok)]
            raise ValueError(f"query image(s) missing or not decodable: {', '.join(bad[:5])}")
        return vectors, list(cfg.images), [None] * len(vectors)
    vectors, meta = embed_split_in_process(model_dir, cfg.data_dir, cfg.split)
    labels = meta.column("path").to_pylist()
    return vectors, labels, meta.column("identity").to_pylist()


def search_queries(cfg: SearchJobConfig) -> dict:
    """Run the queries against the index; the result as a JSON-ready dict."""
    from reidscale.index.gallery import Gallery

    gallery = Gallery(cfg.index_dir)
    vectors, labels, truth = _queries(cfg, gallery)
    if cfg.distinct_identities:
        identities, scores, rows = gallery.search_identities(vectors, cfg.k)
    else:
        scores, rows = gallery.search(vectors, cfg.k)
        identities = gallery.identities(rows)
    dist = distances(scores, gallery.metric)
    cams, paths = gallery.cameras(rows), gallery.paths(rows)
    results = []
    for q in range(len(vectors)):
        valid = rows[q] >= 0
        matches = [{"rank": int(r) + 1, "identity": int(identities[q, r]), "distance": round(float(dist[q, r]), 6),
                    "row_id": int(rows[q, r]), "camera": int(cams[q, r]), "path": str(paths[q, r])}
                   for r in np.flatnonzero(valid)]
        entry = {"query": labels[q], "matches": matches}
        if truth[q] is not None:
            entry["query_identity"] = int(truth[q])
        results.append(entry)
    summary = {"index_dir": str(cfg.index_dir), "generation": gallery.generation, "metric": gallery.metric,
               "distance": "cosine" if gallery.metric == "ip" else "euclidean", "k": cfg.k,
               "distinct_identities": cfg.distinct_identities, "num_queries": len(results), "results": results}
    if truth and truth[0] is not None:
        summary["rank1_accuracy"] = float(np.mean([r["matches"] and r["matches"][0]["identity"] == r["query_identity"]
                                                   for r in results]))
    return summary


def format_table(summary: dict) -> str:
    lines = [f"{'query':<40} {'rank':>4} {'identity':>10} {'distance':>9} {'camera':>6}  path"]
    for result in summary["results"]:
        name = str(result["query"])[-40:]
        for m in result["matches"] or [{"rank": "-", "identity": "-", "distance": float("nan"), "camera": "-", "path": ""}]:
            lines.append(f"{name:<40} {m['rank']:>4} {m['identity']:>10} {m['distance']:>9.4f} {m['camera']:>6}  {m['path']}")
            name = ""
    lines.append(f"{summary['num_queries']} queries, top {summary['k']} "
                 f"{'identities' if summary['distinct_identities'] else 'images'}, {summary['distance']} distance")
    if "rank1_accuracy" in summary:
        lines.append(f"rank-1 accuracy against the query identities: {summary['rank1_accuracy']:.4f}")
    return "\n".join(lines)


def run_search(cfg: SearchJobConfig) -> dict:
    """The job: search, print a table or the JSON document (``format=json``), write ``out``."""
    summary = search_queries(cfg)
    if cfg.out:
        atomic_write_json(cfg.out, summary)
    if cfg.format == "json":
        # The results are the job's output, not a summary of it: printed whole, on stdout.
        print(json.dumps(summary, indent=2))
        return summary
    print(format_table(summary))
    if cfg.out:
        print(f"results: {cfg.out}")
    return summary
