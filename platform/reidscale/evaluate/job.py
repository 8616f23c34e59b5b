"""The evaluate job: embed query (and gallery, unless an index has it), score, plot, log."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from reidscale import atomic, tracking
from reidscale.config import ConfigError
from reidscale.data import shards
from reidscale.embed import EmbedConfig, embed_split, read_embeddings
from reidscale.models import exported
from reidscale.tracking import TrackingConfig

log = logging.getLogger(__name__)


@dataclass
class EvalJobConfig:
    run_dir: str = "runs/demo"
    # exported embedding model; empty: <run_dir>/models/trained
    model_dir: str = ""
    # empty: <run_dir>/data
    data_dir: str = ""
    # a built index whose gallery embeddings are reused; empty: <run_dir>/index/<model dir name> if it exists
    index_dir: str = ""
    # name of this result in summary.json and MLflow; empty: the model directory's name
    label: str = ""
    metric: str = "cosine"
    max_rank: int = 50
    # impostor distances kept for the histogram (a uniform sample; genuine ones are all kept)
    max_impostor_samples: int = 200_000
    # also score k-reciprocal re-ranking (Zhong et al. 2017): summary keys rerank_rank1, rerank_mAP, ...
    rerank: bool = False
    rerank_k1: int = 20
    rerank_k2: int = 6
    rerank_lambda: float = 0.3
    # gallery items re-ranked per query, the rest keeping their order after them; 0: the whole gallery
    # (exact, what papers report; a short list is faster but lowers mAP when true matches lie beyond it)
    rerank_candidates: int = 0
    # also score Rank-1/5/10, mAP, mINP by searching the built index (index_dir; Gallery.search) beside the
    # exact ones: summary keys index_rank1, index_mAP, ...; see through_index_metrics for the truncation rule
    through_index: bool = False
    # gallery items the index returns per query for through_index (same-camera junk included)
    index_candidates: int = 100
    # false accept rate at which open_set.json's score threshold is set (the online service's "unknown" cut)
    open_set_far: float = 1e-3
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        if self.metric not in ("cosine", "euclidean"):
            raise ConfigError(f"metric: {self.metric!r} is not one of cosine, euclidean")
        if self.max_rank < 1:
            raise ConfigError("max_rank: must be >= 1")
        if self.rerank_k1 < 1:
            raise ConfigError(f"rerank_k1: must be >= 1, got {self.rerank_k1}")
        if not 1 <= self.rerank_k2 <= self.rerank_k1:
            raise ConfigError(f"rerank_k2: must be in [1, rerank_k1={self.rerank_k1}], got {self.rerank_k2}")
        if not 0.0 <= self.rerank_lambda <= 1.0:
            raise ConfigError(f"rerank_lambda: must be in [0, 1], got {self.rerank_lambda}")
        if self.index_candidates < 1:
            raise ConfigError(f"index_candidates: must be >= 1, got {self.index_candidates}")
        if not 0.0 < self.open_set_far < 1.0:
            raise ConfigError(f"open_set_far: must be in (0, 1), got {self.open_set_far}")
        if self.rerank_candidates < 0:
            raise ConfigError(f"rerank_candidates: must be >= 0 (0: the whole gallery), got {self.rerank_candidates}")


def _resolve(cfg: EvalJobConfig) -> EvalJobConfig:
    run_dir = Path(cfg.run_dir).resolve()
    model_dir = Path(cfg.model_dir).resolve() if cfg.model_dir else run_dir / "models" / "trained"
    index_dir = Path(cfg.index_dir).resolve() if cfg.index_dir else run_dir / "index" / model_dir.name
    return replace(
        cfg,
        run_dir=str(run_dir),
        model_dir=str(model_dir),
        data_dir=str(Path(cfg.data_dir).resolve() if cfg.data_dir else run_dir / "data"),
        index_dir=str(index_dir),
        label=cfg.label or model_dir.name,
    )


def _verified_embedding_files(index_dir: Path, manifest: dict) -> list[Path]:
    """The index's stored embedding shards, each checked against its sha256 before use.

    The index manifest lists them with their sha256 (``index/job.py``); a manifest written
    before it did is checked against the embedding job's own record (``embeddings.json``).
    Raises GalleryError (a ValueError, one line naming the file) on a missing or changed file.
    """
    from reidscale.embed import EMBEDDINGS_MANIFEST
    from reidscale.index import manifest as store

    emb = manifest["embeddings"]
    emb_dir = index_dir / emb["dir"]
    sha = emb.get("sha256")
    if not sha:
        record = emb_dir / EMBEDDINGS_MANIFEST
        if not record.is_file():
            raise store.GalleryError(f"{emb_dir}: stored embeddings have no sha256 in {index_dir / store.MANIFEST} "
                                     f"nor a {EMBEDDINGS_MANIFEST}; rebuild the index (jobs/build_index.py)")
        sha = json.loads(record.read_text()).get("file_sha256", {})
    paths = []
    for name in emb["files"]:
        if name not in sha:
            raise store.GalleryError(f"{emb_dir / name}: no sha256 recorded for it; refusing to use it")
        paths.append(store.verified(index_dir, {"file": f"{emb['dir']}/{name}", "sha256": sha[name]}))
    return paths


def _gallery_embeddings(cfg: EvalJobConfig, model_sha: str, work: Path):
    manifest_path = Path(cfg.index_dir) / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("model_sha256") == model_sha and manifest.get("embeddings"):
            paths = _verified_embedding_files(Path(cfg.index_dir), manifest)
            # print, not log: tests/test_end_to_end.py reads this line from the job's stdout
            print(f"gallery embeddings from index {cfg.index_dir} (sha256 checked)", flush=True)
            return read_embeddings(paths[0].parent, [p.name for p in paths])
        print(f"index {cfg.index_dir} was built with another model; embedding the gallery again", flush=True)
    stats = embed_split(cfg.model_dir, cfg.data_dir, "gallery", work / "gallery", cfg.embed,
                        job_name=f"evaluate-{cfg.label}")
    return read_embeddings(work / "gallery", stats["files"])


def _true_match_counts(g_ids, g_cams, q_ids, q_cams) -> np.ndarray:
    """Per query: gallery items of its identity in another camera (its true matches under the protocol)."""
    def count(keys, table):
        uniq, n = np.unique(table, axis=0, return_counts=True)
        pos = np.clip(np.searchsorted(uniq.view([("", uniq.dtype)] * uniq.shape[1]).ravel(),
                                      keys.view([("", keys.dtype)] * keys.shape[1]).ravel()), 0, len(uniq) - 1)
        return np.where((uniq[pos] == keys).all(axis=1), n[pos], 0)

    g = np.stack([g_ids, g_cams], axis=1).astype(np.int64)
    q = np.stack([q_ids, q_cams], axis=1).astype(np.int64)
    return count(q[:, :1].copy(), g[:, :1].copy()) - count(q, g)


def through_index_metrics(gallery, q: np.ndarray, qids: np.ndarray, qcams: np.ndarray, candidates: int) -> dict:
    """Rank-1/5/10, mAP, mINP of ranking each query's top ``candidates`` hits from ``gallery.search``.

    The index's order is the ranking (scores as the index computes them, approximate for IVF/PQ).
    Truncation: only the top N = min(candidates, gallery size) hits are ranked, same-camera junk
    (same identity AND camera, removed as in ``evaluate_reid``) included in the N. A true match
    the index does not return within them counts as ranked after everything: it adds nothing to
    AP's sum but still counts in AP's denominator (the query's true matches in the gallery's
    metadata), a query whose first true match is missing is a miss at every rank, and INP is 0
    unless every true match was returned. So with N >= the gallery and an exact (Flat) index this
    is ``evaluate_reid``; truncation alone can only lower it; an approximate index lowers it where
    it misses true matches (it can raise it only by dropping an impostor that outranks a match).
    Keys: index_rank1, index_rank5, index_rank10, index_mAP, index_mINP, index_candidates.
    """
    from reidscale.evaluate.metrics import bad_rows, summarise
    from reidscale.index.metric import eval_metric_for

    q = np.asarray(q, dtype=np.float32)
    bad_rows(q, "query", eval_metric_for(gallery.metric))
    if gallery.metric == "ip":  # the index holds unit vectors; scores are cosine for unit queries
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g_ids, g_cams = gallery.live_labels()  # every live row: each query's true-match count
    totals = _true_match_counts(g_ids, g_cams, np.asarray(qids), np.asarray(qcams))
    n = max(1, min(candidates, gallery.ntotal))
    _, rows = gallery.search(q, n)
    ids, cams = gallery.identities(rows), gallery.cameras(rows)
    first_rank, ap, inp = [], [], []
    for i in range(len(q)):
        total = int(totals[i])
        if total == 0:  # no true match in the gallery: skipped, as evaluate_reid does
            continue
        kept = (rows[i] >= 0) & ~((ids[i] == qids[i]) & (cams[i] == qcams[i]))
        rank = np.cumsum(kept) - 1  # rank among the kept hits
        r = rank[kept & (ids[i] == qids[i])]
        first_rank.append(r[0] if len(r) else 10**9)
        ap.append(float(((np.arange(len(r)) + 1) / (r + 1.0)).sum() / total))
        inp.append(total / (r[-1] + 1.0) if len(r) == total else 0.0)
    if not first_rank:
        raise ValueError("no query has a true match in the gallery (after the camera filter)")
    result = summarise([(np.asarray(first_rank), np.asarray(ap), np.asarray(inp))], max_rank=10)
    return {**_rank_metrics(result, "index_"), "index_candidates": int(n)}


def _rank_metrics(result: dict, prefix: str = "") -> dict:
    cmc = np.asarray(result["cmc"])
    return {
        f"{prefix}rank1": float(cmc[0]),
        f"{prefix}rank5": float(cmc[min(4, len(cmc) - 1)]),
        f"{prefix}rank10": float(cmc[min(9, len(cmc) - 1)]),
        f"{prefix}mAP": float(result["mAP"]),
        f"{prefix}mINP": float(result["mINP"]),
    }


def ranking_metrics(q: np.ndarray, g: np.ndarray, qids: np.ndarray, gids: np.ndarray, qcams: np.ndarray,
                    gcams: np.ndarray, cfg: EvalJobConfig) -> tuple[dict, dict]:
    """(metrics, CMC curves) of the plain ranking, and with ``cfg.rerank`` of the re-ranked one too.

    metrics: rank1/5/10, mAP, mINP, query/gallery counts; re-ranked: the same names prefixed
    ``rerank_`` (Market-1501 protocol, AP over all true matches; see ``evaluate_reid_reranked``)
    plus ``rerank_seconds``. curves: "cmc" and, re-ranked, "rerank_cmc" (float arrays).
    """
    from reidscale.evaluate import evaluate_reid, evaluate_reid_reranked

    result = evaluate_reid(q, g, qids, gids, qcams, gcams, metric=cfg.metric, max_rank=cfg.max_rank)
    metrics = {**_rank_metrics(result), "num_valid_queries": int(result["num_valid_queries"]),
               "num_queries": int(len(q)), "num_gallery": int(len(g))}
    curves = {"cmc": np.asarray(result["cmc"])}
    if cfg.rerank:
        log.info(f"re-ranking: k1={cfg.rerank_k1} k2={cfg.rerank_k2} lambda={cfg.rerank_lambda} "
                 f"candidates={cfg.rerank_candidates or 'all'} over {len(q)} + {len(g)} items")
        start = time.perf_counter()
        rr = evaluate_reid_reranked(q, g, qids, gids, qcams, gcams, metric=cfg.metric, max_rank=cfg.max_rank,
                                    k1=cfg.rerank_k1, k2=cfg.rerank_k2, lambda_value=cfg.rerank_lambda,
                                    candidates=cfg.rerank_candidates or None)
        metrics.update(_rank_metrics(rr, "rerank_"), rerank_seconds=time.perf_counter() - start)
        curves["rerank_cmc"] = np.asarray(rr["cmc"])
    return metrics, curves


def roc_points(roc, num: int = 121) -> dict:
    """The ROC at FARs log-spaced over [1e-6, 1] (TAR at FAR <= each): small enough for metrics.json,
    enough for the overlay figure of every model."""
    from reidscale.evaluate import tar_at_far

    fars = np.unique(np.concatenate([np.logspace(-6, 0, num), [1.0 / max(roc.num_impostor, 1)]]))
    return {"far": fars.tolist(), "tar": [tar_at_far(roc, float(f)) for f in fars]}


def open_set_record(roc, cfg: EvalJobConfig, gallery_metric: str, model_sha: str) -> dict:
    """open_set.json's content: the score threshold at ``cfg.open_set_far`` in the gallery's score space."""
    from reidscale.evaluate import equal_error_rate, tar_at_far, threshold_at_far
    from reidscale.evaluate.open_set import score_threshold

    distance = threshold_at_far(roc, cfg.open_set_far)
    return {
        "metric": gallery_metric,
        "score_threshold": score_threshold(distance, cfg.metric, gallery_metric),
        "target_far": float(cfg.open_set_far),
        "tar_at_far": tar_at_far(roc, cfg.open_set_far),
        "eer": equal_error_rate(roc)[0],
        "model_sha256": model_sha,
        "label": cfg.label,
        "data_dir": cfg.data_dir,
        "genuine_pairs": int(roc.num_genuine),
        "impostor_pairs": int(roc.num_impostor),
        "source": (f"jobs/evaluate.py label={cfg.label} on {cfg.data_dir} query vs gallery, {roc.num_genuine} genuine / "
                   f"{roc.num_impostor} impostor pairs, FAR target {cfg.open_set_far:g}"),
    }


def score_embeddings(cfg: EvalJobConfig, q, q_meta, g, g_meta, model_sha: str, work: Path, gallery=None,
                     index_metric: str | None = None) -> dict:
    """Everything computed from the embeddings (no Ray): metrics, verification, plots, metrics.json,
    open_set.json (also into ``cfg.index_dir`` when an index is in use: ``index_metric`` is its
    manifest's metric, or ``gallery`` the opened index, which through_index searches).

    One definition of genuine/impostor pairs for the histogram, the ROC and the EER: the ReID
    protocol's (same identity = genuine, minus same identity AND same camera; different
    identity = impostor), with ``evaluate_reid``'s distances.
    Returns {"metrics", "verification", "open_set", "plots", "curves"}.
    """
    from reidscale.evaluate import plot_cmc, plot_distance_histograms, plot_roc, roc_from_features, verification_metrics
    from reidscale.index.metric import gallery_metric_for
    from reidscale.evaluate.verification import pair_distances

    qids, gids = q_meta.column("identity").to_numpy(), g_meta.column("identity").to_numpy()
    qcams, gcams = q_meta.column("camera").to_numpy(), g_meta.column("camera").to_numpy()
    metrics, curves = ranking_metrics(q, g, qids, gids, qcams, gcams, cfg)
    if cfg.through_index:
        if gallery is None:
            raise ValueError(f"through_index=true: no built index at {cfg.index_dir} (build one with jobs/build_index.py)")
        metrics.update(through_index_metrics(gallery, q, qids, qcams, cfg.index_candidates))
    roc = roc_from_features(q, g, qids, gids, qcams, gcams, metric=cfg.metric)
    verification = verification_metrics(roc)
    genuine, impostor, num_impostor = pair_distances(q, g, qids, gids, qcams, gcams, metric=cfg.metric,
                                                     max_impostors=cfg.max_impostor_samples)
    distance_name = "cosine distance" if cfg.metric == "cosine" else "squared Euclidean distance"
    plots = [
        plot_cmc(curves["cmc"], work / "cmc.png", label=cfg.label),
        plot_distance_histograms(genuine, impostor, work / "distances.png",
                                 title=f"{cfg.label}: {distance_name}, same vs different identity (same-camera "
                                       f"same-identity excluded)", impostor_total=num_impostor),
        plot_roc(roc.far, roc.tar, work / "roc.png", label=cfg.label),
    ]
    rerank_params = ({"rerank_params": {"k1": cfg.rerank_k1, "k2": cfg.rerank_k2, "lambda": cfg.rerank_lambda,
                                        "candidates": cfg.rerank_candidates or "all"}} if cfg.rerank else {})
    if index_metric is None and gallery is not None:
        index_metric = gallery.metric
    gallery_metric = index_metric or gallery_metric_for(cfg.metric)
    open_set = open_set_record(roc, cfg, gallery_metric, model_sha)
    atomic.write_json(work / "metrics.json", {**metrics, "verification": verification, **rerank_params,
                                              "roc": roc_points(roc), "histogram_genuine_pairs": int(len(genuine)),
                                              **{name: curve.tolist() for name, curve in curves.items()}})
    atomic.write_json(work / "open_set.json", open_set)
    if index_metric is not None:  # beside the index for the online service; not part of the index manifest
        atomic.write_json(Path(cfg.index_dir) / "open_set.json", open_set)
    return {"metrics": metrics, "verification": verification, "open_set": open_set, "plots": plots,
            "curves": curves, "rerank_params": rerank_params, "histogram_genuine_pairs": int(len(genuine))}


def overlay_plots(run_dir: Path, summary: dict) -> list[Path]:
    """One CMC and one ROC figure with every model in summary.json (from each label's metrics.json)."""
    from reidscale.evaluate import plot_cmc, plot_roc

    cmcs, rocs, labels = [], [], []
    for label in summary:
        path = run_dir / "eval" / label / "metrics.json"
        if not path.is_file():
            continue
        m = json.loads(path.read_text())
        if "cmc" in m and "roc" in m:
            labels.append(label)
            cmcs.append(np.asarray(m["cmc"]))
            rocs.append((np.asarray(m["roc"]["far"]), np.asarray(m["roc"]["tar"])))
    if not labels:
        return []
    return [plot_cmc(cmcs, run_dir / "eval" / "cmc_all.png", labels, title="CMC, every model evaluated"),
            plot_roc([r[0] for r in rocs], [r[1] for r in rocs], run_dir / "eval" / "roc_all.png", label=labels,
                     title="ROC, every model evaluated")]


def _index_in_use(cfg: EvalJobConfig, model_sha: str):
    """(manifest, Gallery or None) of the index at cfg.index_dir when it holds this model's gallery, else
    (None, None). The index itself is loaded only for through_index (a 1M index is GiBs)."""
    from reidscale.index import manifest as store

    if not (Path(cfg.index_dir) / store.MANIFEST).is_file():
        return None, None
    manifest = store.read_manifest(cfg.index_dir)
    if manifest.get("model_sha256") not in (None, "", model_sha):
        if cfg.through_index:
            raise ValueError(f"through_index=true: index {cfg.index_dir} was built with another model "
                             f"({manifest['model_sha256'][:12]}, this one {model_sha[:12]})")
        return None, None
    if not cfg.through_index:
        return manifest, None
    from reidscale.index.gallery import Gallery

    return manifest, Gallery(cfg.index_dir)


def evaluate_model(cfg: EvalJobConfig) -> dict:
    cfg = _resolve(cfg)
    if cfg.through_index and not (Path(cfg.index_dir) / "manifest.json").is_file():
        raise FileNotFoundError(f"through_index=true: no built index at {cfg.index_dir} "
                                f"(python jobs/build_index.py model_dir={cfg.model_dir})")
    model_config = exported.read_export_config(cfg.model_dir)
    model_sha = exported.model_sha(cfg.model_dir)
    work = Path(cfg.run_dir) / "eval" / cfg.label
    q_stats = embed_split(cfg.model_dir, cfg.data_dir, "query", work / "query", cfg.embed,
                          job_name=f"evaluate-{cfg.label}")
    q, q_meta = read_embeddings(work / "query", q_stats["files"])
    g, g_meta = _gallery_embeddings(cfg, model_sha, work)
    manifest, gallery = _index_in_use(cfg, model_sha)
    scored = score_embeddings(cfg, q, q_meta, g, g_meta, model_sha, work, gallery,
                              manifest["metric"] if manifest else None)
    metrics, verification, rerank_params = scored["metrics"], scored["verification"], scored["rerank_params"]

    summary_path = Path(cfg.run_dir) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary[cfg.label] = {**metrics, "tar_at_far_1e-3": verification["tar@far=0.001"], "eer": verification["eer"],
                          "model_dir": cfg.model_dir, **rerank_params}
    atomic.write_json(summary_path, summary)
    overlays = overlay_plots(Path(cfg.run_dir), summary)

    uri = tracking.tracking_uri(cfg.tracking, cfg.run_dir)
    c = tracking.client(uri)
    # one run per evaluated model, named by its label, with the same metric keys for every
    # model, so the UI compares them side by side; tags link it to the training run and model
    run_id = tracking.start_run(uri, cfg.tracking.experiment, f"evaluate-{cfg.label}", params=cfg,
                                tags={"reidscale.job": "evaluate", "reidscale.label": cfg.label,
                                      **tracking.lineage_tags(c, model_config)})
    tracking.log_dataset(c, run_id, cfg.data_dir, shards.read_manifest(cfg.data_dir), ("query", "gallery"),
                         context="evaluation")
    tracking.log_metrics(c, run_id, evaluation_metrics(metrics, verification))
    for path in scored["plots"] + [work / "metrics.json", work / "open_set.json"]:
        c.log_artifact(run_id, str(path), artifact_path="eval")
    for path in overlays:
        c.log_artifact(run_id, str(path), artifact_path="eval")
    c.log_artifact(run_id, str(summary_path))
    c.set_terminated(run_id)

    print(format_summary(summary))
    o = scored["open_set"]
    print(f"open set: {o['metric']} score threshold {o['score_threshold']:.4f} at FAR {o['target_far']:g} "
          f"(TAR {o['tar_at_far']:.4f}) -> {work / 'open_set.json'}" + (f" and {cfg.index_dir}/open_set.json"
                                                                       if manifest else ""))
    print(f"summary: {summary_path}")
    print(f"MLflow: {tracking.ui_command(uri)}")
    return None


def evaluation_metrics(metrics: dict, verification: dict) -> dict[str, float]:
    """The MLflow metrics of an evaluation run: ``rank1``/``rank5``/``rank10``/``mAP``/``mINP``
    (and ``rerank_*``, ``index_*`` when scored), ``eer`` and ``tar_at_far_1e-3`` under the keys
    MLflow users expect, then every other verification figure under its own name."""
    out = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for key, value in verification.items():
        if key.startswith(("tar@far=", "threshold@far=")):
            far = float(key.split("=", 1)[1])
            name = key.split("@", 1)[0]
            out[f"{name}_at_far_{far:.0e}".replace("e-0", "e-")] = float(value)
        else:
            out[key] = float(value)
    return out


def format_summary(summary: dict) -> str:
    """One row per result; a result evaluated with rerank=true gets a second row, "<label> +rerank", and
    one with through_index=true a row "<label> via index@N"."""
    cols = ("rank1", "rank5", "rank10", "mAP", "mINP")
    rows = []
    for label, m in summary.items():
        rows.append((label, [m[c] for c in cols]))
        if "rerank_mAP" in m:
            rows.append((f"{label} +rerank", [m[f"rerank_{c}"] for c in cols]))
        if "index_mAP" in m:  # the same queries ranked by the built index (top index_candidates hits)
            rows.append((f"{label} via index@{m['index_candidates']}", [m[f"index_{c}"] for c in cols]))
    width = max([12] + [len(name) + 1 for name, _ in rows])
    lines = [f"{'model':<{width}}" + "".join(f"{c:>9}" for c in cols)]
    for name, values in rows:
        lines.append(f"{name:<{width}}" + "".join(f"{v:>9.4f}" for v in values))
    if "trained" in summary and "untrained" in summary and summary["untrained"]["mAP"] > 0:
        ratio = summary["trained"]["mAP"] / summary["untrained"]["mAP"]
        lines.append(f"trained mAP / untrained mAP = {ratio:.1f}x")
    return "\n".join(lines)
