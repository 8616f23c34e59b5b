"""The build-index job: embed a gallery split with an exported model (or take precomputed
vectors), then build the sharded index."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reidscale import atomic, tracking
from reidscale.config import ConfigError
from reidscale.data import shards
from reidscale.atomic import sha256_file
from reidscale.embed import EMBEDDINGS_MANIFEST, EmbedConfig, embed_split, finished_embeddings, read_embeddings
from reidscale.index.build import build_index, params_string
from reidscale.index.calibrate import CalibrationSpec
from reidscale.index.metric import GALLERY_METRICS
from reidscale.index.rows import NpyRows, ParquetRows, l2_normalise
from reidscale.models import exported
from reidscale.tracking import TrackingConfig

log = logging.getLogger(__name__)

FACTORY_CHECK_DIMS = (64, 128, 256, 384, 512, 768, 1024, 2048)


@dataclass
class IndexJobConfig:
    run_dir: str = "runs/demo"
    # exported embedding model; empty: <run_dir>/models/trained
    model_dir: str = ""
    # empty: <run_dir>/data
    data_dir: str = ""
    split: str = "gallery"
    # empty: <run_dir>/index/<model directory name> (or <embeddings name> with embeddings=)
    out_dir: str = ""
    # precomputed vectors instead of embedding images: a directory of embedding shards
    # (embeddings-*.parquet, as this job writes) or an N×D float32 .npy (row ids 0..N-1;
    # identity/camera/path from <same name>.parquet beside it when present)
    embeddings: str = ""
    # "auto" picks by size and memory_budget_gb; or any FAISS factory string ("Flat", "IVF1024,PQ256x4fs,RFlat", "HNSW32")
    factory: str = "auto"
    metric: str = "ip"
    num_shards: int = 1
    # memory the loaded index may take (GiB); decides Flat / IVF-PQ + exact re-rank / IVF-PQ + SQ8 re-rank / IVF-PQ
    memory_budget_gb: float = 8.0
    # search-time settings stored in the manifest, FAISS ParameterSpace syntax ("nprobe=64,k_factor_rf=16");
    # empty: chosen with the factory
    search_params: str = ""
    # vectors sampled to train IVF/PQ; 0: 64 per IVF cell
    train_size: int = 0
    # measure search settings on this gallery after building (ignored when search_params are given):
    # the cheapest nprobe / k_factor_rf / efSearch whose recall@recall_k against exact search reaches target_recall
    calibrate: bool = True
    target_recall: float = 0.95
    recall_k: int = 10
    # queries for calibration: empty = a seeded sample of gallery rows (each one's own row excluded);
    # an N×D float32 .npy of query vectors; or a split of data_dir ("query"), embedded with the model
    calibration_queries: str = ""
    calibration_sample: int = 1000
    calibration_seed: int = 0
    # a setting reaches target_recall when the one-sided lower confidence bound of its mean recall over
    # the sampled queries does (0.5: the mean itself), so the sample's own noise cannot pick a setting
    # that misses on new queries
    calibration_confidence: float = 0.95
    # Gallery.add re-calibrates once the rows added since the last calibration exceed this fraction of the gallery
    recalibrate_fraction: float = 0.1
    # L2-normalise precomputed vectors that are not (metric ip is then cosine)
    normalize: bool = True
    # check, hash and fill each shard in a Ray task (spread over the cluster's nodes; joins RAY_ADDRESS or
    # starts a private Ray); the vectors are then read from their files by each shard's task, never all
    # into this process. out_dir must be a path every node sees. Same shard files as false.
    shard_tasks: bool = False
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        if self.metric not in GALLERY_METRICS:
            raise ConfigError(f"metric: {self.metric!r} is not one of {', '.join(GALLERY_METRICS)}")
        if self.num_shards < 1:
            raise ConfigError("num_shards: must be >= 1")
        if self.memory_budget_gb <= 0:
            raise ConfigError("memory_budget_gb: must be > 0")
        if self.factory != "auto":
            import faiss

            for dim in FACTORY_CHECK_DIMS:
                try:
                    faiss.index_factory(dim, self.factory)
                    break
                except RuntimeError as exc:
                    error = exc
            else:
                raise ConfigError(f"factory: {self.factory!r} is not a FAISS factory string ({error})")
        try:
            parse_search_params(self.search_params)
        except ValueError as exc:
            raise ConfigError(f"search_params: {exc}") from None
        if self.embeddings and not Path(self.embeddings).exists():
            raise ConfigError(f"embeddings: {self.embeddings} does not exist")
        try:
            self.calibration_spec().validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        q = self.calibration_queries
        if q.endswith(".npy") and not Path(q).is_file():
            raise ConfigError(f"calibration_queries: {q} does not exist")
        if q and not q.endswith(".npy") and self.embeddings:
            raise ConfigError(f"calibration_queries: split {q!r} needs a model to embed it; with embeddings= give "
                              "a .npy of query vectors")

    def calibration_spec(self) -> CalibrationSpec:
        return CalibrationSpec(target_recall=self.target_recall, recall_k=self.recall_k, sample=self.calibration_sample,
                               seed=self.calibration_seed, recalibrate_fraction=self.recalibrate_fraction,
                               confidence=self.calibration_confidence)

    def resolved(self) -> "IndexJobConfig":
        run_dir = Path(self.run_dir).resolve()
        model_dir = Path(self.model_dir).resolve() if self.model_dir else run_dir / "models" / "trained"
        default_name = Path(self.embeddings).stem if self.embeddings else model_dir.name
        return replace(
            self,
            run_dir=str(run_dir),
            model_dir=str(model_dir),
            data_dir=str(Path(self.data_dir).resolve() if self.data_dir else run_dir / "data"),
            out_dir=str(Path(self.out_dir).resolve() if self.out_dir else run_dir / "index" / default_name),
            embeddings=str(Path(self.embeddings).resolve()) if self.embeddings else "",
            calibration_queries=(str(Path(self.calibration_queries).resolve())
                                 if self.calibration_queries.endswith(".npy") else self.calibration_queries),
        )


def parse_search_params(text: str) -> dict:
    """``"nprobe=64,k_factor_rf=16"`` → ``{"nprobe": 64, "k_factor_rf": 16}``."""
    params = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"{item!r} is not name=value")
        try:
            params[name] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            raise ValueError(f"{item!r}: {value!r} is not a number") from None
    return params


def _embeddings_stats(directory: Path) -> dict:
    """The embedding step's manifest beside its Parquet files ({} for a directory without one)."""
    stats_path = directory / EMBEDDINGS_MANIFEST
    return json.loads(stats_path.read_text()) if stats_path.is_file() else {}


def load_precomputed(path: str | Path, normalize: bool = True) -> tuple[np.ndarray, pa.Table, str]:
    """(N×D float32 vectors, metadata table, model sha256 or "") from precomputed embeddings.

    A ``.npy`` is memory-mapped, not read: a 1M × 512 gallery costs pages, not a copy,
    unless it has to be normalised.
    """
    path = Path(path)
    model_sha = ""
    if path.is_dir():
        stats = _embeddings_stats(path)
        model_sha = stats.get("model_sha256", "")
        vectors, metadata = read_embeddings(path, stats.get("files"))
    elif path.suffix == ".npy":
        vectors = np.load(path, mmap_mode="r")
        if vectors.ndim != 2 or vectors.dtype != np.float32:
            raise ValueError(f"{path}: expected an N×D float32 array, got {vectors.shape} {vectors.dtype}")
        metadata = _npy_metadata(path, len(vectors))
    else:
        raise ValueError(f"{path}: embeddings must be a directory of embedding shards or a .npy file")
    if normalize and not _normalised(vectors):
        vectors = _l2_normalise(vectors)
    return vectors, metadata, model_sha


def _npy_metadata(path: Path, n: int) -> pa.Table:
    """identity/camera/path of an .npy's rows from ``<same name>.parquet``, else row ids 0..n-1 alone."""
    meta_path = path.with_suffix(".parquet")
    if meta_path.is_file():
        metadata = pq.read_table(meta_path, columns=["row_id", "identity", "camera", "path"])
        if len(metadata) != n:
            raise ValueError(f"{meta_path}: {len(metadata)} rows for {n} vectors")
        return metadata
    return pa.table({"row_id": np.arange(n, dtype=np.int64), "identity": np.full(n, -1, np.int64),
                     "camera": np.full(n, -1, np.int32), "path": pa.array([""] * n)})


def open_precomputed_rows(path: str | Path, normalize: bool = True) -> tuple[object, pa.Table, str]:
    """``load_precomputed`` without reading the vectors: (an ``index.rows`` source, metadata, model sha256).

    Rows come out as ``load_precomputed``'s would, byte for byte (normalised as they are read
    when the file's rows are not unit length)."""
    path = Path(path)
    model_sha = ""
    if path.is_dir():
        stats = _embeddings_stats(path)
        model_sha = stats.get("model_sha256", "")
        rows = ParquetRows.open(path, stats.get("files"))
        metadata = _embedding_metadata(rows)
    elif path.suffix == ".npy":
        rows = NpyRows.open(path)
        metadata = _npy_metadata(path, len(rows))
    else:
        raise ValueError(f"{path}: embeddings must be a directory of embedding shards or a .npy file")
    if normalize and not _normalised(rows):
        rows = replace(rows, normalize=True)
    return rows, metadata, model_sha


def _embedding_metadata(rows: ParquetRows) -> pa.Table:
    """The embedding shards' columns but the vectors (what ``read_embeddings`` returns beside them)."""
    tables = []
    for name in rows.files:
        schema = pq.read_schema(Path(rows.directory) / name)
        tables.append(pq.read_table(Path(rows.directory) / name, columns=[c for c in schema.names if c != "embedding"]))
    return pa.concat_tables(tables)


def _normalised(vectors: np.ndarray, sample: int = 10_000) -> bool:
    rows = vectors[np.linspace(0, len(vectors) - 1, min(sample, len(vectors))).astype(int)]
    return bool(np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-3))


def _l2_normalise(vectors: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    out = np.empty(vectors.shape, np.float32)
    for lo in range(0, len(vectors), chunk):
        x = np.asarray(vectors[lo : lo + chunk], dtype=np.float32)
        out[lo : lo + chunk] = l2_normalise(x)
    return out


def _calibration_queries(cfg: IndexJobConfig, out_dir: Path) -> np.ndarray | None:
    q = cfg.calibration_queries
    if not q:
        return None
    if q.endswith(".npy"):
        queries = np.load(q, mmap_mode="r")
        if queries.ndim != 2 or queries.dtype != np.float32:
            raise ValueError(f"{q}: expected an N×D float32 array of query vectors, got {queries.shape} {queries.dtype}")
        queries = np.asarray(queries)
        return _l2_normalise(queries) if cfg.normalize and cfg.metric == "ip" and not _normalised(queries) else queries
    emb_dir = out_dir / f"calibration-{q}"
    stats = embed_split(cfg.model_dir, cfg.data_dir, q, emb_dir, cfg.embed,
                        job_name=f"build_index-{Path(cfg.out_dir).name}")
    return read_embeddings(emb_dir, stats["files"])[0]


def summary_lines(summary: dict) -> list[str]:
    """The few lines a person reads after a build (the JSON file has everything)."""
    lines = [f"index {summary['index_dir']}: {summary['ntotal']:,} vectors, {summary['factory']}, "
             f"{summary['num_shards']} shard(s), built in {summary['build_time_s']:.1f}s"]
    cal = summary.get("calibration")
    if cal:
        lines.append(f"  search settings {params_string(cal['chosen']) or '(none)'}: recall@{cal['recall_k']} "
                     f"{cal['recall_at_k']:.4f}, recall@1 {cal['recall_at_1']:.4f}, {cal['qps']:,.0f} queries/s "
                     f"(measured on {cal['sample']} {cal['queries_source']}, seed {cal['seed']}, "
                     f"{cal['settings_tried']} settings in {cal['time_s']:.1f}s)")
        if not cal["reached"]:
            lines.append(f"  WARNING: {cal['message']}")
    else:
        lines.append(f"  search settings {params_string(summary['search']) or '(none)'} (given, not calibrated)")
    return lines


def build_gallery_index(cfg: IndexJobConfig) -> dict:
    """Embed (or load) the gallery, build the index; write ``<out_dir>/build_summary.json``; return the summary."""
    cfg = cfg.resolved()
    out_dir = Path(cfg.out_dir)
    extra: dict = {"split": cfg.split}
    model_dir = None
    if cfg.embeddings:
        load = open_precomputed_rows if cfg.shard_tasks else load_precomputed
        vectors, metadata, model_sha = load(cfg.embeddings, cfg.normalize)
        embed_stats = {"embedded": len(vectors), "source": cfg.embeddings}
        extra["embeddings_source"] = cfg.embeddings
    else:
        model_sha = exported.model_sha(cfg.model_dir)  # refuses a directory that is not an export, naming its maker
        emb_dir = out_dir / "embeddings"
        embed_stats = finished_embeddings(emb_dir, model_sha, cfg.data_dir, cfg.split)
        if embed_stats is not None:
            log.info(f"embeddings in {emb_dir} are complete for this model and data; not embedding again")
        else:
            embed_stats = embed_split(cfg.model_dir, cfg.data_dir, cfg.split, emb_dir, cfg.embed,
                                      job_name=f"build_index-{out_dir.name}")
        if cfg.shard_tasks:
            vectors = ParquetRows.open(emb_dir, embed_stats["files"])
            metadata = _embedding_metadata(vectors)
        else:
            vectors, metadata = read_embeddings(emb_dir, embed_stats["files"])
        model_dir = cfg.model_dir
        extra.update({"data_dir": cfg.data_dir,
                      # sha256 per file, so a reader that reuses them (jobs/evaluate.py) can check them
                      "embeddings": {"dir": "embeddings", "files": embed_stats["files"],
                                     "sha256": embed_stats.get("file_sha256")
                                     or {f: sha256_file(emb_dir / f) for f in embed_stats["files"]}}})
    calibrate = cfg.calibrate and not cfg.search_params
    manifest = build_index(
        vectors, metadata, out_dir, factory=cfg.factory, metric=cfg.metric, num_shards=cfg.num_shards,
        model_sha256=model_sha, memory_budget_bytes=int(cfg.memory_budget_gb * 2**30),
        search_params=parse_search_params(cfg.search_params), train_size=cfg.train_size, extra=extra,
        calibration=cfg.calibration_spec() if calibrate else None,
        calibration_queries=_calibration_queries(cfg, out_dir) if calibrate else None,
        model_dir=model_dir, source=f"gallery vectors from {cfg.embeddings or cfg.split}", shard_tasks=cfg.shard_tasks,
    )
    summary = {"index_dir": str(out_dir), "ntotal": manifest["ntotal"], "factory": manifest["factory"],
               "search": manifest["search"], "num_shards": len(manifest["shards"]),
               "build_time_s": manifest["build_time_s"], "embed": embed_stats}
    cal = manifest.get("calibration")
    if cal:
        summary["calibration"] = {k: cal[k] for k in ("target_recall", "recall_k", "sample", "seed", "queries_source",
                                                       "chosen", "recall_at_1", "recall_at_k", "qps", "reached",
                                                       "message", "time_s", "generation")}
        summary["calibration"].update({"settings_tried": len(cal["tried"]), "plot": "calibration.png"})
        summary["calibration_time_fraction"] = cal["time_s"] / max(manifest["build_time_s"], 1e-9)
    atomic.write_json(out_dir / "build_summary.json", summary)
    for line in summary_lines(summary):
        print(line, flush=True)
    uri = tracking.tracking_uri(cfg.tracking, cfg.run_dir)
    c = tracking.client(uri)
    lineage = (tracking.lineage_tags(c, exported.read_export_config(model_dir)) if model_dir
               else {"reidscale.model_sha256": model_sha or ""})
    run_id = tracking.start_run(uri, cfg.tracking.experiment, f"build_index-{out_dir.name}", params=cfg,
                                tags={"reidscale.job": "build_index", "reidscale.index_dir": str(out_dir), **lineage})
    if model_dir:
        tracking.log_dataset(c, run_id, cfg.data_dir, shards.read_manifest(cfg.data_dir), (cfg.split,),
                             context="index")
    metrics = {"ntotal": manifest["ntotal"], "build_time_s": manifest["build_time_s"]}
    if "images_per_s" in embed_stats:
        metrics.update({"embed_images_per_s": embed_stats["images_per_s"],
                        "embed_images_per_s_per_actor": embed_stats["images_per_s_per_actor"],
                        "decode_errors": embed_stats["decode_errors"]})
    if cal:
        metrics.update({"index_recall_at_k": cal["recall_at_k"], "index_recall_at_1": cal["recall_at_1"],
                        "index_qps": cal["qps"], "index_calibration_time_s": cal["time_s"],
                        "index_target_reached": float(cal["reached"]),
                        **{f"index_{k}": v for k, v in cal["chosen"].items()}})
    tracking.log_metrics(c, run_id, metrics)
    c.log_artifact(run_id, str(out_dir / "manifest.json"))
    c.log_artifact(run_id, str(out_dir / "build_summary.json"))
    if cal and (out_dir / "calibration.png").is_file():
        c.log_artifact(run_id, str(out_dir / "calibration.png"))
    c.set_terminated(run_id)
    return summary
