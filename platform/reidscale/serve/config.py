"""``ServeConfig``: what ``jobs/serve.py`` and the ``serve run``/``serve deploy`` builder read."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from reidscale.config import ConfigError, load_config

# the bearer token is read from this variable when the config does not set one, so it
# need not be written into a YAML file or a shell history
TOKEN_ENV = "REIDSCALE_SERVE_TOKEN"


@dataclass
class EmbedderConfig:
    replicas: int = 1
    # images per model call; requests' images are batched across requests up to this
    max_batch_size: int = 32
    # how long a batch waits to fill before it runs with what it has
    batch_wait_ms: float = 5.0
    num_cpus: float = 1.0
    # "auto": one GPU per replica when the cluster has GPUs
    use_gpu: Literal["auto", "true", "false"] = "auto"
    # torch intra-op threads per replica (0: torch's default)
    threads: int = 0

    def validate(self) -> None:
        for name in ("replicas", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: {getattr(self, name)}; must be >= 1")
        for name in ("batch_wait_ms", "num_cpus", "threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: {getattr(self, name)}; must be >= 0")


@dataclass
class GalleryServeConfig:
    # more than one replica is for read load; writes serialise on the index's file lock
    # and other replicas see them within refresh_s
    replicas: int = 1
    num_cpus: float = 1.0
    # how often a replica looks for a generation another writer published
    refresh_s: float = 1.0
    # FAISS search-time overrides, e.g. {nprobe: 64}
    search_params: dict[str, Any] = field(default_factory=dict)
    # check every index file's sha256 when loading (slow for very large indexes)
    verify: bool = True
    # serve from shard actors spread over the cluster's nodes (index.distributed.DistributedGallery)
    # instead of one Gallery inside the replica: for a gallery larger than one machine's memory
    distributed: bool = False
    # shard actors when distributed (0: one per alive node), and the CPUs (FAISS threads) of each
    actors: int = 0
    actor_cpus: float = 1.0
    # map the shards from disk instead of reading them into memory (index.generation.load_shard):
    # a node then serves more vectors than its memory; searches touch pages the kernel caches
    mmap: bool = False

    def service_options(self) -> dict:
        """``serve.gallery.GalleryService``'s keyword arguments for this section (one mapping, so
        the deployment and the tests build the service the same way)."""
        return {"search_params": dict(self.search_params), "verify": self.verify, "refresh_s": self.refresh_s,
                "distributed": {"num_actors": self.actors, "actor_cpus": self.actor_cpus} if self.distributed else None,
                "mmap": self.mmap}

    def validate(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"replicas: {self.replicas}; must be >= 1")
        if self.distributed and self.replicas != 1:
            raise ConfigError(f"replicas: {self.replicas} with distributed=true; each replica would start its own "
                              "shard actors (a copy of the gallery each): use 1")
        if self.actors < 0 or self.actor_cpus <= 0:
            raise ConfigError(f"actors: {self.actors}, actor_cpus: {self.actor_cpus}; need actors >= 0 and actor_cpus > 0")
        if self.num_cpus < 0:
            raise ConfigError(f"num_cpus: {self.num_cpus}; must be >= 0")
        if self.refresh_s <= 0:
            raise ConfigError(f"refresh_s: {self.refresh_s}; must be > 0")


@dataclass
class ServeConfig:
    # a built index directory (manifest.json); enrolments and deletions are written into it
    index_dir: str = ""
    # exported embedding model; empty: the model_dir recorded in the index manifest.
    # "none" serves vectors only (no image endpoints)
    model_dir: str = ""
    # 127.0.0.1 by default: exposing the service is an explicit decision
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    # required as `Authorization: Bearer <token>` on every endpoint but /health when set;
    # empty: read $REIDSCALE_SERVE_TOKEN; both empty: no authentication
    token: str = ""
    # open-set decision: same identity when score >= threshold (ip) / squared L2 <= threshold (l2).
    # null: <index_dir>/open_set.json from jobs/evaluate.py; neither: `is_new` is null
    score_threshold: float | None = None
    # a JSON file with that threshold; empty: <index_dir>/open_set.json
    open_set_file: str = ""
    max_request_mb: float = 32.0
    max_image_mb: float = 4.0
    max_items: int = 256  # images or vectors per request
    max_k: int = 1000
    # one log line per request in each replica's log (Serve's access log)
    access_log: bool = True
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    gallery: GalleryServeConfig = field(default_factory=GalleryServeConfig)

    def validate(self) -> None:
        if not self.index_dir:
            raise ConfigError("index_dir: required (a directory built by jobs/build_index.py)")
        if not (Path(self.index_dir) / "manifest.json").is_file():
            raise ConfigError(f"index_dir: {self.index_dir} holds no manifest.json (build it with jobs/build_index.py)")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port: {self.port} is not a TCP port")
        for name in ("max_request_mb", "max_image_mb", "max_items", "max_k"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: {getattr(self, name)}; must be > 0")
        if self.max_image_mb > self.max_request_mb:
            raise ConfigError("max_image_mb: larger than max_request_mb; no request could carry such an image")
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"route_prefix: {self.route_prefix!r} must start with /")

    def resolved_token(self) -> str:
        return self.token or os.environ.get(TOKEN_ENV, "")


def config_from_args(args: dict) -> ServeConfig:
    """A validated ``ServeConfig`` from a nested dict (the ``args`` of a Serve config file)."""
    overrides: list[str] = []

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and key != "search_params":
                walk(value, f"{prefix}{key}.")
            else:
                # JSON is YAML, so load_config reads every value back with its type
                overrides.append(f"{prefix}{key}={json.dumps(value)}")

    walk(dict(args or {}), "")
    return load_config(ServeConfig, None, overrides)
