"""The embedder deployment: images from many requests batched into one model call (``@serve.batch``).

``ImageEmbedder`` is the plain logic (load the exported safetensors model once, decode
and embed a list of images on CPU or GPU), the same decode and model as
``reidscale.embed.embed_images`` so the service's vectors are the in-process ones.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def model_summary(model_dir: str | Path) -> dict:
    """What the ingress needs to know of an export without loading it: dim, weights hash, SIE cameras."""
    from reidscale.models.exported import read_export_config

    config = read_export_config(model_dir)
    return {"model_dir": str(model_dir), "dim": int(config["dim"]), "weights_sha256": config.get("weights_sha256", ""),
            "sie_cameras": int(config["model"].get("sie_cameras", 0) or 0),
            "backbone": config["model"].get("backbone", "")}


class ImageEmbedder:
    """Encoded images (+ cameras for SIE models) → L2-normalised float32 vectors, None where undecodable."""

    def __init__(self, model_dir: str, threads: int = 0):
        import torch

        from reidscale.models.reid import load_embedding_model

        if threads > 0:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.config = load_embedding_model(model_dir)
        self.model.to(self.device)
        log.info("embedder: %s on %s (dim %d)", model_dir, self.device, self.config["dim"])

    def __call__(self, images: list[bytes], cameras: list[int] | None = None) -> list[np.ndarray | None]:
        from reidscale.models.inference import embed_encoded

        vectors, decoded = embed_encoded(self.model, self.config["transform_config"], images, cameras,
                                         device=self.device)
        return [v if ok else None for v, ok in zip(vectors, decoded)]


def embedder_deployment():
    """The Ray Serve deployment class (built here so importing this module needs no Ray)."""
    from ray import serve

    @serve.deployment(name="embedder")
    class EmbedderDeployment:
        def __init__(self, model_dir: str, max_batch_size: int, batch_wait_s: float, threads: int):
            logging.basicConfig(level=logging.INFO)
            self.embedder = ImageEmbedder(model_dir, threads)
            self.sie = int(self.embedder.config["model"].get("sie_cameras", 0) or 0)
            self.embed.set_max_batch_size(max_batch_size)
            self.embed.set_batch_wait_timeout_s(batch_wait_s)
            self.batches, self.images, self.largest = 0, 0, 0

        async def stats(self) -> dict:
            """This replica's batching so far: how many model calls for how many images."""
            return {"batches": self.batches, "images": self.images, "largest_batch": self.largest,
                    "mean_batch": round(self.images / max(self.batches, 1), 2)}

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
        async def embed(self, items: list[tuple[bytes, int | None]]) -> list[np.ndarray | None]:
            """One image (and its camera) per call; Serve gathers concurrent calls into ``items``."""
            images = [b for b, _ in items]
            cameras = [c for _, c in items] if self.sie else None
            self.batches, self.images = self.batches + 1, self.images + len(items)
            self.largest = max(self.largest, len(items))
            # in a thread: the event loop keeps queueing the next batch while this one runs
            return await asyncio.to_thread(self.embedder, images, cameras)

    return EmbedderDeployment
