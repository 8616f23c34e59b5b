"""The build-index job: embed a gallery split with an exported model, then build the index."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from reidscale import tracking
from reidscale.config import ConfigError
from reidscale.embed import EmbedConfig, embed_split, read_embeddings
from reidscale.index.build import build_index
from reidscale.tracking import TrackingConfig


@dataclass
class IndexJobConfig:
    run_dir: str = "runs/demo"
    # exported embedding model; empty: <run_dir>/models/trained
    model_dir: str = ""
    # empty: <run_dir>/data
    data_dir: str = ""
    split: str = "gallery"
    # empty: <run_dir>/index/<model directory name>
    out_dir: str = ""
    # "auto" picks by size; or any FAISS factory string ("Flat", "IVF4096,PQ64", "HNSW32")
    factory: str = "auto"
    metric: str = "ip"
    num_shards: int = 1
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        if self.metric not in ("ip", "l2"):
            raise ConfigError(f"metric: {self.metric!r} is not one of ip, l2")
        if self.num_shards < 1:
            raise ConfigError("num_shards: must be >= 1")
        if self.factory != "auto":
            import faiss

            try:
                faiss.index_factory(8 if "PQ" not in self.factory else 64, self.factory)
            except RuntimeError as exc:
                raise ConfigError(f"factory: {self.factory!r} is not a FAISS factory string ({exc})") from None

    def resolved(self) -> "IndexJobConfig":
        run_dir = Path(self.run_dir).resolve()
        model_dir = Path(self.model_dir).resolve() if self.model_dir else run_dir / "models" / "trained"
        return IndexJobConfig(
            **{
                **self.__dict__,
                "run_dir": str(run_dir),
                "model_dir": str(model_dir),
                "data_dir": str(Path(self.data_dir).resolve() if self.data_dir else run_dir / "data"),
                "out_dir": str(Path(self.out_dir).resolve() if self.out_dir else run_dir / "index" / model_dir.name),
            }
        )


def build_gallery_index(cfg: IndexJobConfig) -> dict:
    cfg = cfg.resolved()
    if not (Path(cfg.model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"model_dir {cfg.model_dir}: no exported embedding model (run the training job first)")
    out_dir = Path(cfg.out_dir)
    emb_dir = out_dir / "embeddings"
    embed_stats = embed_split(cfg.model_dir, cfg.data_dir, cfg.split, emb_dir, cfg.embed)
    vectors, metadata = read_embeddings(emb_dir, embed_stats["files"])
    manifest = build_index(
        vectors, metadata, out_dir, factory=cfg.factory, metric=cfg.metric, num_shards=cfg.num_shards,
        model_sha256=embed_stats["model_sha256"],
        extra={"model_dir": cfg.model_dir, "data_dir": cfg.data_dir, "split": cfg.split,
               "embeddings": {"dir": "embeddings", "files": embed_stats["files"]}},
    )
    summary = {"index_dir": str(out_dir), "ntotal": manifest["ntotal"], "factory": manifest["factory"],
               "num_shards": len(manifest["shards"]), "build_time_s": manifest["build_time_s"], "embed": embed_stats}
    uri = tracking.tracking_uri(cfg.tracking, cfg.run_dir)
    run_id = tracking.start_run(uri, cfg.tracking.experiment, f"build_index-{Path(cfg.model_dir).name}", params=cfg,
                                tags={"reidscale.job": "build_index"})
    c = tracking.client(uri)
    tracking.log_metrics(c, run_id, {"ntotal": manifest["ntotal"], "build_time_s": manifest["build_time_s"],
                                     "embed_images_per_s": embed_stats["images_per_s"],
                                     "embed_images_per_s_per_actor": embed_stats["images_per_s_per_actor"],
                                     "decode_errors": embed_stats["decode_errors"]})
    c.log_artifact(run_id, str(out_dir / "manifest.json"))
    c.set_terminated(run_id)
    return summary
