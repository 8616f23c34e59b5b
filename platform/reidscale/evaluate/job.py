"""The evaluate job: embed query (and gallery, unless an index has it), score, plot, log."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from reidscale import tracking
from reidscale.config import ConfigError
from reidscale.data.shards import atomic_write_json
from reidscale.embed import EmbedConfig, embed_split, read_embeddings
from reidscale.tracking import TrackingConfig


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


def _gallery_embeddings(cfg: EvalJobConfig, model_sha: str, work: Path):
    manifest_path = Path(cfg.index_dir) / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("model_sha256") == model_sha and manifest.get("embeddings"):
            emb = manifest["embeddings"]
            print(f"gallery embeddings from index {cfg.index_dir}", flush=True)
            return read_embeddings(Path(cfg.index_dir) / emb["dir"], emb["files"])
        print(f"index {cfg.index_dir} was built with another model; embedding the gallery again", flush=True)
    stats = embed_split(cfg.model_dir, cfg.data_dir, "gallery", work / "gallery", cfg.embed)
    return read_embeddings(work / "gallery", stats["files"])


def pair_distances(q: np.ndarray, g: np.ndarray, qids: np.ndarray, gids: np.ndarray, metric: str,
                   max_impostors: int, seed: int = 0, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """All genuine (same identity) and a uniform sample of impostor query-gallery distances."""
    rng = np.random.default_rng(seed)
    total_impostors = int(len(qids) * len(gids) - (qids[:, None] == gids[None, :]).sum())
    keep = min(1.0, max_impostors / max(total_impostors, 1))
    genuine, impostor = [], []
    for lo in range(0, len(q), chunk):
        qs = q[lo : lo + chunk]
        if metric == "cosine":
            d = 1.0 - qs @ g.T
        else:
            d = np.sqrt(np.maximum((qs**2).sum(1)[:, None] + (g**2).sum(1)[None, :] - 2 * qs @ g.T, 0))
        same = qids[lo : lo + chunk, None] == gids[None, :]
        genuine.append(d[same])
        imp = d[~same]
        impostor.append(imp[rng.random(len(imp)) < keep])
    return np.concatenate(genuine), np.concatenate(impostor)


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
        print(f"re-ranking: k1={cfg.rerank_k1} k2={cfg.rerank_k2} lambda={cfg.rerank_lambda} "
              f"candidates={cfg.rerank_candidates or 'all'} over {len(q)} + {len(g)} items", flush=True)
        start = time.perf_counter()
        rr = evaluate_reid_reranked(q, g, qids, gids, qcams, gcams, metric=cfg.metric, max_rank=cfg.max_rank,
                                    k1=cfg.rerank_k1, k2=cfg.rerank_k2, lambda_value=cfg.rerank_lambda,
                                    candidates=cfg.rerank_candidates or None)
        metrics.update(_rank_metrics(rr, "rerank_"), rerank_seconds=time.perf_counter() - start)
        curves["rerank_cmc"] = np.asarray(rr["cmc"])
    return metrics, curves


def evaluate_model(cfg: EvalJobConfig) -> dict:
    from reidscale.evaluate import plot_cmc, plot_distance_histograms, plot_roc, roc_from_features, verification_metrics
    from reidscale.models.reid import load_embedding_model

    cfg = _resolve(cfg)
    _, model_config = load_embedding_model(cfg.model_dir)
    work = Path(cfg.run_dir) / "eval" / cfg.label
    q_stats = embed_split(cfg.model_dir, cfg.data_dir, "query", work / "query", cfg.embed)
    q, q_meta = read_embeddings(work / "query", q_stats["files"])
    g, g_meta = _gallery_embeddings(cfg, model_config["weights_sha256"], work)
    qids, gids = q_meta.column("identity").to_numpy(), g_meta.column("identity").to_numpy()
    qcams, gcams = q_meta.column("camera").to_numpy(), g_meta.column("camera").to_numpy()
    metrics, curves = ranking_metrics(q, g, qids, gids, qcams, gcams, cfg)
    cmc = curves["cmc"]
    rerank_params = ({"rerank_params": {"k1": cfg.rerank_k1, "k2": cfg.rerank_k2, "lambda": cfg.rerank_lambda,
                                        "candidates": cfg.rerank_candidates or "all"}} if cfg.rerank else {})
    roc = roc_from_features(q, g, qids, gids, qcams, gcams, metric=cfg.metric)
    verification = verification_metrics(roc)
    genuine, impostor = pair_distances(q, g, qids, gids, cfg.metric, cfg.max_impostor_samples)
    plots = [
        plot_cmc(cmc, work / "cmc.png", label=cfg.label),
        plot_distance_histograms(genuine, impostor, work / "distances.png",
                                 title=f"{cfg.label}: {cfg.metric} distance, same vs different identity"),
        plot_roc(roc.far, roc.tar, work / "roc.png", label=cfg.label),
    ]
    atomic_write_json(work / "metrics.json", {**metrics, "verification": verification, **rerank_params,
                                              **{name: curve.tolist() for name, curve in curves.items()}})

    summary_path = Path(cfg.run_dir) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary[cfg.label] = {**metrics, "tar_at_far_1e-3": verification["tar@far=0.001"], "eer": verification["eer"],
                          "model_dir": cfg.model_dir, **rerank_params}
    atomic_write_json(summary_path, summary)

    uri = tracking.tracking_uri(cfg.tracking, cfg.run_dir)
    c = tracking.client(uri)
    run_id = model_config.get("mlflow_run_id")
    try:
        c.get_run(run_id) if run_id else None
    except Exception:  # the model came from another tracking store
        run_id = None
    if not run_id:
        run_id = tracking.start_run(uri, cfg.tracking.experiment, f"evaluate-{cfg.label}", params=cfg,
                                    tags={"reidscale.job": "evaluate"})
    tracking.log_metrics(c, run_id, {f"eval_{cfg.label}_{k}": v for k, v in {**metrics, **verification}.items()})
    for path in plots + [work / "metrics.json"]:
        c.log_artifact(run_id, str(path), artifact_path=f"eval/{cfg.label}")
    c.log_artifact(run_id, str(summary_path))

    print(format_summary(summary))
    print(f"summary: {summary_path}")
    print(f"MLflow: {tracking.ui_command(uri)}")
    return None


def format_summary(summary: dict) -> str:
    """One row per result; a result evaluated with rerank=true gets a second row, "<label> +rerank"."""
    cols = ("rank1", "rank5", "rank10", "mAP", "mINP")
    rows = []
    for label, m in summary.items():
        rows.append((label, [m[c] for c in cols]))
        if "rerank_mAP" in m:
            rows.append((f"{label} +rerank", [m[f"rerank_{c}"] for c in cols]))
    width = max([12] + [len(name) + 1 for name, _ in rows])
    lines = [f"{'model':<{width}}" + "".join(f"{c:>9}" for c in cols)]
    for name, values in rows:
        lines.append(f"{name:<{width}}" + "".join(f"{v:>9.4f}" for v in values))
    if "trained" in summary and "untrained" in summary and summary["untrained"]["mAP"] > 0:
        ratio = summary["trained"]["mAP"] / summary["untrained"]["mAP"]
        lines.append(f"trained mAP / untrained mAP = {ratio:.1f}x")
    return "\n".join(lines)
