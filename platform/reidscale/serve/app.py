"""The Serve application: FastAPI ingress → embedder + gallery deployments; start, run, stop.

``plan`` resolves everything a replica will need on the driver (absolute paths, the
model/index match, the open-set threshold), so a bad config fails before any replica
starts; ``build_app`` binds the three deployments; ``app_builder`` is the import path
for ``serve run`` / ``serve deploy`` config files; ``start``/``run_service`` are what
``jobs/serve.py`` calls.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import threading
from pathlib import Path

import numpy as np

from reidscale.index.gallery import resolve_model_dir
from reidscale.index.manifest import read_manifest
from reidscale.ray_runtime import init_ray, resolve_use_gpu
# at module level: FastAPI resolves the (string) annotations of the routes against these globals
from reidscale.serve import schema as s
from reidscale.serve.config import ServeConfig, config_from_args
from reidscale.serve.embedder import embedder_deployment, model_summary
from reidscale.serve.gallery import gallery_deployment
from reidscale.serve.guard import Guard
from reidscale.serve.openset import OpenSetThreshold, resolve_threshold

log = logging.getLogger(__name__)

APP_NAME = "reidscale"


def plan(cfg: ServeConfig) -> dict:
    """The service's resolved settings; ValueError/FileNotFoundError naming what does not fit."""
    index_dir = Path(cfg.index_dir).resolve()
    manifest = read_manifest(index_dir)
    model = None
    if cfg.model_dir != "none":
        if cfg.model_dir or manifest.get("model_dir"):
            # the index's own rule: a recorded path is relative to the index directory, weights checked
            model_dir = resolve_model_dir(index_dir, manifest, cfg.model_dir or None)
            model = model_summary(model_dir)
            if model["dim"] != int(manifest["dim"]):
                raise ValueError(f"model_dir {model_dir}: {model['dim']}-d embeddings, the index holds "
                                 f"{manifest['dim']}-d vectors")
            if manifest.get("model_sha256") and model["weights_sha256"] != manifest["model_sha256"]:
                raise ValueError(f"model_dir {model_dir}: weights {model['weights_sha256'][:12]} are not the model "
                                 f"this index was built with ({manifest['model_sha256'][:12]})")
        else:
            log.warning("no model_dir given or recorded in %s: serving vector queries only", index_dir)
    threshold = resolve_threshold(index_dir, manifest, cfg.score_threshold, cfg.open_set_file)
    return {
        "index_dir": str(index_dir),
        "model": model,
        "dim": int(manifest["dim"]),
        "metric": manifest["metric"],
        "threshold": {"value": threshold.value, "metric": threshold.metric, "source": threshold.source,
                      "details": threshold.details},
        "token": cfg.resolved_token(),
        "max_request_bytes": int(cfg.max_request_mb * 2**20),
        "max_image_bytes": int(cfg.max_image_mb * 2**20),
        "max_items": cfg.max_items,
        "max_k": cfg.max_k,
        "embedder": {"max_batch_size": cfg.embedder.max_batch_size, "batch_wait_ms": cfg.embedder.batch_wait_ms,
                     "replicas": cfg.embedder.replicas},
        "gallery": {"replicas": cfg.gallery.replicas, "refresh_s": cfg.gallery.refresh_s},
    }


def _json_error(status: int, message: str):
    from fastapi.responses import JSONResponse

    return JSONResponse({"detail": message}, status_code=status)


def ingress_deployment():
    """The FastAPI ingress deployment class (built here so importing this module needs no Ray)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from ray import serve

    api = FastAPI(title="reidscale", description="Object re-identification: search, enrol and delete "
                  "identities in a FAISS gallery. Scores: inner product (metric ip) or squared L2 (l2).")
    settings: dict = {}  # filled by the replica's __init__; read by the guard
    api.add_middleware(Guard, settings=settings)

    @api.exception_handler(s.InputError)
    async def input_error(request: Request, exc: s.InputError):
        return _json_error(exc.status, str(exc))

    @api.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return _json_error(422, f"{where}: {first.get('msg')}{more}")

    @serve.deployment(name="ingress", max_ongoing_requests=128, ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class Ingress:
        def __init__(self, embedder, gallery, plan_: dict):
            logging.basicConfig(level=logging.INFO)
            settings.update(plan_)
            self.plan, self.embedder, self.gallery = plan_, embedder, gallery
            t = plan_["threshold"]
            self.threshold = OpenSetThreshold(t["value"], t["metric"], t["source"], t["details"])
            self.sie = (plan_["model"] or {}).get("sie_cameras", 0)

        async def _vectors(self, images, vectors, cameras, field: str) -> np.ndarray:
            if vectors is not None:
                return s.check_vectors(vectors, self.plan["dim"], self.plan["metric"])
            if self.embedder is None:
                raise s.InputError("images: this service has no embedding model (model_dir=none); send vectors")
            data = s.decode_images(images, self.plan["max_image_bytes"])
            s.check_sie_cameras(cameras, self.sie, field)
            cams = cameras if self.sie else [None] * len(data)
            out = await asyncio.gather(*[self.embedder.embed.remote((d, c)) for d, c in zip(data, cams)])
            for i, v in enumerate(out):
                if v is None:
                    raise s.InputError(f"images[{i}]: not a decodable image")
            return np.stack(out).astype(np.float32)

        @api.get("/health")
        async def health(self) -> dict:
            info = await self.gallery.info.remote()
            return {"status": "ok", "generation": info["generation"]}

        @api.get("/info")
        async def info(self) -> dict:
            gallery = await self.gallery.info.remote()
            batching = await self.embedder.stats.remote() if self.embedder is not None else None
            p = self.plan
            return {
                "index_dir": p["index_dir"], **gallery,
                "model": p["model"],
                "score_threshold": self.threshold.value,
                "threshold_source": self.threshold.source,
                "threshold_details": self.threshold.details,
                "limits": {k: p[k] for k in ("max_request_bytes", "max_image_bytes", "max_items", "max_k")},
                "embedder": {**p["embedder"], "batching_of_one_replica": batching}, "gallery": p["gallery"],
                "auth": "bearer token" if p["token"] else "none",
            }

        @api.post("/search", response_model=s.SearchResponse)
        async def search(self, req: s.SearchRequest) -> dict:
            n = s.one_source(req.images, req.vectors, self.plan["max_items"])
            k = s.check_k(req.k, self.plan["max_k"])
            s.check_cameras(req.query_cameras, n, "query_cameras")
            queries = await self._vectors(req.images, req.vectors, req.query_cameras, "query_cameras")
            r = await self.gallery.search.remote(queries, k, req.cameras, req.exclude_camera)
            is_new = self.threshold.is_new(r["score"][:, 0], r["identity"][:, 0])
            return {"generation": r["generation"], "metric": self.plan["metric"],
                    "score_threshold": self.threshold.value, "results": _search_results(r, is_new)}

        @api.post("/enrol", response_model=s.EnrolResponse)
        async def enrol(self, req: s.EnrolRequest) -> dict:
            n = s.one_source(req.images, req.vectors, self.plan["max_items"])
            s.check_cameras(req.cameras, n, "cameras")
            if req.paths is not None and len(req.paths) != n:
                raise s.InputError(f"paths: {len(req.paths)} labels for {n} items; give one per item")
            if req.identity != "new" and req.identity < 0:
                raise s.InputError(f"identity: {req.identity}; must be >= 0 (or \"new\")")
            vectors = await self._vectors(req.images, req.vectors, req.cameras, "cameras")
            identity = None if req.identity == "new" else int(req.identity)
            return await self.gallery.enrol.remote(vectors, identity, req.cameras, req.paths)

        @api.delete("/rows", response_model=s.DeleteResponse)
        async def delete_rows(self, req: s.DeleteRowsRequest) -> dict:
            if len(req.row_ids) > 100_000:
                raise s.InputError(f"row_ids: {len(req.row_ids)} ids; delete at most 100000 per request", 413)
            return await self.gallery.remove_rows.remote(req.row_ids)

        @api.delete("/identities/{identity}", response_model=s.DeleteResponse)
        async def delete_identity(self, identity: s.Int64) -> dict:
            out = await self.gallery.remove_identity.remote(identity)
            if out["removed"] == 0:
                raise s.InputError(f"identity {identity}: no live rows in the gallery", status=404)
            return out

    return Ingress


def _search_results(r: dict, is_new) -> list[dict]:
    """One ``{"matches": [...], "is_new": bool}`` per query from the gallery's (queries × k) arrays."""
    results = []
    for q in range(len(r["identity"])):
        hits = np.flatnonzero(r["identity"][q] >= 0)  # -1: fewer than k live rows matched
        matches = [{"identity": int(r["identity"][q, j]), "score": float(r["score"][q, j]),
                    "row_id": int(r["row_id"][q, j]), "camera": int(r["camera"][q, j]),
                    "path": str(r["path"][q, j])} for j in hits]
        results.append({"matches": matches, "is_new": is_new[q]})
    return results


def build_app(cfg: ServeConfig, plan_: dict | None = None):
    """The bound Serve application (ingress → embedder, gallery) for ``cfg``."""
    p = plan_ or plan(cfg)
    e, g = cfg.embedder, cfg.gallery
    gallery = gallery_deployment().options(
        num_replicas=g.replicas, ray_actor_options={"num_cpus": g.num_cpus},
    ).bind(p["index_dir"], g.service_options())
    embedder = None
    if p["model"] is not None:
        gpus = resolve_use_gpu(e.use_gpu)
        embedder = embedder_deployment().options(
            num_replicas=e.replicas,
            # each image is one call: a replica must accept a whole batch's worth at once to batch at all
            max_ongoing_requests=4 * e.max_batch_size,
            ray_actor_options={"num_cpus": e.num_cpus, "num_gpus": 1 if gpus else 0},
        ).bind(p["model"]["model_dir"], e.max_batch_size, e.batch_wait_ms / 1000.0, e.threads)
    return ingress_deployment().bind(embedder, gallery, p)


def app_builder(args: dict):
    """``import_path: reidscale.serve.app:app_builder`` in a Serve config file; ``args`` are ServeConfig fields."""
    return build_app(config_from_args(args))


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def start(cfg: ServeConfig) -> str:
    """Start Ray (RAY_ADDRESS's cluster, else a local one) and Serve on ``cfg.host:cfg.port``; return the URL.

    ``port=0`` picks a free port. Returns once every replica is up.
    """
    from ray import serve

    p = plan(cfg)  # before Ray starts: a bad index, model or threshold fails fast
    # RAY_ADDRESS's cluster, else a private loopback Ray (no dashboard) that dies with this process
    init_ray(include_dashboard=False, job_name=f"serve-{Path(p['index_dir']).name}")
    port = cfg.port or free_port(cfg.host)
    serve.start(http_options={"host": cfg.host, "port": port})
    serve.run(build_app(cfg, p), name=APP_NAME, route_prefix=cfg.route_prefix,
              logging_config={"enable_access_log": cfg.access_log})
    url = f"http://{cfg.host}:{port}{cfg.route_prefix.rstrip('/')}"
    log.info("serving %s at %s", p["index_dir"], url)
    return url


def redeploy(cfg: ServeConfig) -> None:
    """Replace the application's replicas with new ones (which reopen the index from disk); Serve stays up."""
    from ray import serve

    serve.delete(APP_NAME)
    serve.run(build_app(cfg), name=APP_NAME, route_prefix=cfg.route_prefix,
              logging_config={"enable_access_log": cfg.access_log})


def stop() -> None:
    """Delete the application and stop Serve's controller and proxies on this cluster."""
    from ray import serve

    serve.shutdown()


def run_service(cfg: ServeConfig) -> dict:
    """``jobs/serve.py``: start, print where, serve until SIGINT/SIGTERM, shut down cleanly."""
    url = start(cfg)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    print(json.dumps({"url": url, "docs": f"{url}/docs", "index_dir": str(Path(cfg.index_dir).resolve())}),
          flush=True)
    print(f"reidscale service at {url} (OpenAPI: {url}/docs); Ctrl-C or SIGTERM stops it", flush=True)
    while not done.wait(0.5):  # short waits: the signal handler runs between them
        pass
    log.info("stopping: deleting the Serve application")
    stop()
    import ray

    ray.shutdown()
    return {"url": url, "stopped": True}
