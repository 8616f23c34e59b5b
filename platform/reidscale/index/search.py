"""The search job: query images, a query split or query vectors → top-k identities with distances."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from reidscale import atomic
from reidscale.config import ConfigError
from reidscale.index import manifest as store
from reidscale.index.metric import eval_metric_for, larger_is_closer


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
    # drop gallery images of the query's own identity AND camera (the ReID protocol, as jobs/evaluate.py
    # scores it) from the results and the rank-1 figure; empty: true for a dataset split, false otherwise
    # (needs each query's identity and camera, which only a split has)
    exclude_same_camera: bool | None = None
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
        if self.exclude_same_camera and not self.split:
            raise ConfigError("exclude_same_camera: needs each query's identity and camera: query a data_dir+split")
        for name in ("index_dir", "vectors", "data_dir"):
            value = getattr(self, name)
            if value and not Path(value).exists():
                remedy = f"; {store.BUILT_BY}" if name == "index_dir" else ""
                raise ConfigError(f"{name}: {value} does not exist{remedy}")


def distances(scores: np.ndarray, metric: str) -> np.ndarray:
    """Scores as distances: cosine distance 1 - s for ip, Euclidean sqrt(s) for l2 (squared L2)."""
    if metric == "ip":
        return 1.0 - scores
    return np.sqrt(np.maximum(scores, 0.0))


PROTOCOLS = {
    True: "ReID protocol: gallery images of the query's identity and camera excluded, as jobs/evaluate.py",
    False: "all gallery images, same-camera matches kept",
}


def _queries(cfg: SearchJobConfig, gallery) -> tuple[np.ndarray, list, list, list]:
    """(vectors, labels naming each query, true identity or None per query, camera or None per query)."""
    if cfg.vectors:
        vectors = np.load(cfg.vectors, allow_pickle=False)
        n = len(vectors)
        return vectors, [f"{Path(cfg.vectors).name}[{i}]" for i in range(n)], [None] * n, [None] * n
    from reidscale.embed import embed_images, embed_split_in_process

    model_dir = gallery.resolve_model_dir(cfg.model_dir or None)
    if cfg.images:
        vectors, ok = embed_images(model_dir, cfg.images, cameras=cfg.cameras or None)
        if not ok.all():
            bad = [cfg.images[i] for i in np.flatnonzero(~ok)]
            raise ValueError(f"query image(s) missing or not decodable: {', '.join(bad[:5])}")
        return vectors, list(cfg.images), [None] * len(vectors), list(cfg.cameras) or [None] * len(vectors)
    vectors, meta = embed_split_in_process(model_dir, cfg.data_dir, cfg.split)
    labels = meta.column("path").to_pylist()
    return vectors, labels, meta.column("identity").to_pylist(), meta.column("camera").to_pylist()


def search_excluding_same_camera(gallery, vectors: np.ndarray, identities: np.ndarray, cameras: np.ndarray, k: int,
                                 distinct: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(identities, scores, row ids), each Q×k, best first, without the gallery images whose identity
    AND camera are the query's (the ReID protocol's junk). ``distinct``: one entry (its best image) per
    identity. Searches deeper until k entries remain or the gallery is exhausted; pads with -1."""
    larger = larger_is_closer(gallery.metric)
    n = len(vectors)
    out_ident = np.full((n, k), -1, np.int64)
    out_score = np.full((n, k), -np.inf if larger else np.inf, np.float32)
    out_row = np.full((n, k), -1, np.int64)
    todo, fetch, total = np.arange(n), 4 * k, max(gallery.ntotal, 1)
    while len(todo):
        depth = min(fetch, total)
        scores, rows = gallery.search(vectors[todo], depth)
        idents, cams = gallery.identities(rows), gallery.cameras(rows)
        again = []
        for j, q in enumerate(todo):
            keep = (rows[j] >= 0) & ~((idents[j] == identities[q]) & (cams[j] == cameras[q]))
            pos = np.flatnonzero(keep)
            if distinct:
                _, first = np.unique(idents[j][pos], return_index=True)
                pos = pos[np.sort(first)]
            pos = pos[:k]
            if len(pos) < k and depth < total:
                again.append(q)
            out_ident[q, : len(pos)] = idents[j][pos]
            out_score[q, : len(pos)] = scores[j][pos]
            out_row[q, : len(pos)] = rows[j][pos]
        todo, fetch = np.asarray(again, dtype=np.int64), 4 * fetch
    return out_ident, out_score, out_row


def search_queries(cfg: SearchJobConfig) -> dict:
    """Run the queries against the index; the result as a JSON-ready dict."""
    from reidscale.index.gallery import Gallery

    gallery = Gallery(cfg.index_dir)
    vectors, labels, truth, query_cams = _queries(cfg, gallery)
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"{cfg.vectors or 'queries'}: query vectors must be N×D, got shape {vectors.shape}")
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(f"{cfg.vectors or 'queries'}: {len(bad)} query vector(s) with NaN/inf, e.g. row(s) "
                         f"{', '.join(map(str, bad[:5]))}; refusing to search them")
    exclude = bool(cfg.split) if cfg.exclude_same_camera is None else cfg.exclude_same_camera
    if exclude:
        identities, scores, rows = search_excluding_same_camera(
            gallery, vectors, np.asarray(truth, dtype=np.int64), np.asarray(query_cams, dtype=np.int64), cfg.k,
            cfg.distinct_identities)
    elif cfg.distinct_identities:
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
        if query_cams[q] is not None:
            entry["query_camera"] = int(query_cams[q])
        results.append(entry)
    summary = {"index_dir": str(cfg.index_dir), "generation": gallery.generation, "metric": gallery.metric,
               "distance": eval_metric_for(gallery.metric), "k": cfg.k,
               "distinct_identities": cfg.distinct_identities, "exclude_same_camera": exclude,
               "num_queries": len(results), "results": results}
    if truth and truth[0] is not None:
        # rank-1 over the queries that have a true match left in the gallery (as jobs/evaluate.py skips the others)
        has_match = _has_true_match(gallery, np.asarray(truth), np.asarray(query_cams), exclude)
        hits = [bool(r["matches"]) and r["matches"][0]["identity"] == r["query_identity"] for r in results]
        summary["rank1_accuracy"] = float(np.mean(np.asarray(hits)[has_match])) if has_match.any() else 0.0
        summary["rank1_queries"] = int(has_match.sum())
        summary["protocol"] = PROTOCOLS[exclude]
    return summary


def _has_true_match(gallery, identities: np.ndarray, cameras: np.ndarray, exclude: bool) -> np.ndarray:
    """Per query: does the gallery hold an image of its identity (in another camera, with ``exclude``)?"""
    g_ids, g_cams = gallery.live_labels()
    return np.array([((g_ids == i) & ((g_cams != c) if exclude else True)).any() for i, c in zip(identities, cameras)],
                    dtype=bool)


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
        lines.append(f"rank-1 accuracy against the query identities: {summary['rank1_accuracy']:.4f} "
                     f"({summary['protocol']})")
    return "\n".join(lines)


def run_search(cfg: SearchJobConfig) -> dict:
    """The job: search, print a table or the JSON document (``format=json``), write ``out``."""
    summary = search_queries(cfg)
    if cfg.out:
        atomic.write_json(cfg.out, summary)
    if cfg.format == "json":
        # The results are the job's output, not a summary of it: printed whole, on stdout.
        print(json.dumps(summary, indent=2))
        return summary
    print(format_table(summary))
    if cfg.out:
        print(f"results: {cfg.out}")
    return summary
