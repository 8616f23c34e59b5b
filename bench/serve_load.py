"""Latency and throughput of the online service (reidscale.serve) under a bounded closed loop on 127.0.0.1,
against the in-process path a user would otherwise script (Gallery.search / search_identities + embed_images).

    python bench/serve_load.py --index-dir runs/demo/index/trained            # model from the manifest
    python bench/serve_load.py --index-dir ... --requests 300 --time-limit 30 --concurrency 1,8,32

Works on a copy of the index (the mixed run enrols into it). Query images are the first
--images images of the index's data_dir query split (or the gallery split). Each load run is
closed-loop: C clients, each sending its next request when the previous answer arrives,
until --requests answers or --time-limit seconds. Client and service share the machine.
The mixed run adds enrolment clients (vectors, identity "new") to vector searches and then
checks on disk that every acknowledged enrolment is there exactly once and nothing else is.
Writes bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_results  # noqa: E402


def percentiles(latencies_s: list[float]) -> dict:
    ms = np.asarray(latencies_s) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def query_images(index_dir: Path, n: int) -> list[bytes]:
    import pyarrow.parquet as pq

    from reidscale.data import shards

    data_dir = json.loads((index_dir / "manifest.json").read_text()).get("data_dir")
    if not data_dir:
        raise SystemExit(f"{index_dir}: the manifest names no data_dir to take query images from")
    out: list[bytes] = []
    for split in ("query", "gallery"):
        for path in shards.verify_split(data_dir, split, checksums=False):
            out += pq.read_table(path, columns=["image"]).column("image").to_pylist()[: n - len(out)]
            if len(out) >= n:
                return out
    return out


def in_process(gallery, model_dir, vectors: np.ndarray, images: list[bytes], k: int, n: int) -> list[dict]:
    """One query at a time, like a handler that calls the library directly; plus a batched row."""
    from reidscale.embed import embed_images

    rows = []
    lat = []
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        gallery.search_identities(vectors[i % len(vectors)][None], k)
        lat.append(time.perf_counter() - t)
    rows.append({"path": "in-process", "query": "vector", "concurrency": 1, "requests": n,
                 "req_per_s": round(n / (time.perf_counter() - t0), 1), **percentiles(lat)})
    embed_images(model_dir, images[:2])  # load the model before timing
    lat, m = [], min(n, 200)
    t0 = time.perf_counter()
    for i in range(m):
        t = time.perf_counter()
        v, _ = embed_images(model_dir, [images[i % len(images)]])
        gallery.search_identities(v, k)
        lat.append(time.perf_counter() - t)
    rows.append({"path": "in-process", "query": "image", "concurrency": 1, "requests": m,
                 "req_per_s": round(m / (time.perf_counter() - t0), 1), **percentiles(lat)})
    # the batched ceiling: 32 images per model call, what @serve.batch can approach at best
    batch = [images[i % len(images)] for i in range(32)]
    t0, reps = time.perf_counter(), max(1, m // 32)
    for _ in range(reps):
        v, _ = embed_images(model_dir, batch)
        gallery.search_identities(v, k)
    wall = time.perf_counter() - t0
    rows.append({"path": "in-process, batches of 32", "query": "image", "concurrency": 1, "requests": reps * 32,
                 "req_per_s": round(reps * 32 / wall, 1), "p50_ms": "", "p95_ms": "", "p99_ms": ""})
    return rows


async def closed_loop(url: str, bodies: list[dict], concurrency: int, requests: int, time_limit: float,
                      path: str = "/search") -> dict:
    import aiohttp

    lat, statuses, sent = [], {}, 0
    deadline = time.perf_counter() + time_limit

    async def client(session, c):
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            body = bodies[(sent + c) % len(bodies)]
            sent += 1
            t = time.perf_counter()
            async with session.post(url + path, json=body) as r:
                await r.read()
                statuses[r.status] = statuses.get(r.status, 0) + 1
            lat.append(time.perf_counter() - t)

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(s, c) for c in range(concurrency)])
        wall = time.perf_counter() - t0
    return {"requests": len(lat), "req_per_s": round(len(lat) / wall, 1), "statuses": statuses, **percentiles(lat)}


async def mixed(url: str, bodies: list[dict], dim: int, searchers: int, enrollers: int, requests: int,
                time_limit: float) -> dict:
    """Searches and enrolments at once; returns the acknowledged enrolments with the statuses."""
    import aiohttp

    rng = np.random.default_rng(0)
    acked, statuses, lat_enrol = [], {}, []
    deadline = time.perf_counter() + time_limit
    per_enroller = max(1, requests // 10 // max(enrollers, 1))

    async def enroller(session, e):
        for j in range(per_enroller):
            if time.perf_counter() >= deadline:
                return
            v = rng.standard_normal((2, dim)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            t = time.perf_counter()
            async with session.post(url + "/enrol", json={"vectors": v.tolist(), "identity": "new",
                                                          "paths": [f"bench-{e}-{j}-{i}" for i in range(2)]}) as r:
                body = await r.json()
                statuses[r.status] = statuses.get(r.status, 0) + 1
                if r.status == 200:
                    acked.append(body)
            lat_enrol.append(time.perf_counter() - t)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        search = asyncio.create_task(closed_loop(url, bodies, searchers, requests, time_limit))
        await asyncio.gather(*[enroller(s, e) for e in range(enrollers)])
        searched = await search
    return {"search": searched, "enrol_statuses": statuses, "enrolments": len(acked), "acked": acked,
            "enrol": percentiles(lat_enrol) if lat_enrol else {}}


def check_enrolments(index_dir: Path, before_rows: int, acked: list[dict]) -> dict:
    """Every acknowledged enrolment on disk exactly once, under its identity; no rows beyond them."""
    from reidscale.index.gallery import Gallery

    g = Gallery(index_dir)
    rows = np.asarray([r for a in acked for r in a["row_ids"]], dtype=np.int64)
    want = np.asarray([a["identity"] for a in acked for _ in a["row_ids"]], dtype=np.int64)
    found = g.identities(rows)
    return {"acknowledged_rows": int(len(rows)), "distinct_row_ids": int(len(np.unique(rows))),
            "distinct_new_identities": int(len({a["identity"] for a in acked})),
            "rows_with_acknowledged_identity": int((found == want).sum()),
            "gallery_rows_added": int(g.ntotal - before_rows),
            "ok": bool(len(np.unique(rows)) == len(rows) and (found == want).all()
                       and g.ntotal - before_rows == len(rows) and len({a["identity"] for a in acked}) == len(acked))}


def _get_json(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index-dir", required=True)
    ap.add_argument("--model-dir", default="", help="default: the model recorded in the index manifest")
    ap.add_argument("--requests", type=int, default=400, help="answers per load run")
    ap.add_argument("--time-limit", type=float, default=40.0, help="seconds per load run")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--images", type=int, default=64, help="distinct query images")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch threads in-process and per embedder replica (Ray gives a 0.5-CPU actor 1 OpenMP "
                         "thread; the same here keeps the comparison fair on a shared machine)")
    ap.add_argument("--name", default="serve_load")
    args = ap.parse_args()

    from reidscale.embed import embed_images
    from reidscale.index.gallery import Gallery
    from reidscale.serve import app
    from reidscale.serve.config import config_from_args

    import torch

    torch.set_num_threads(args.torch_threads)
    src = Path(args.index_dir).resolve()
    work = Path(tempfile.mkdtemp(prefix="serve_load-"))
    index_dir = work / "index"
    shutil.copytree(src, index_dir)
    gallery = Gallery(index_dir)
    # resolved against the original index (the manifest's path is relative to it; the copy sits elsewhere)
    model_dir = Gallery(src).resolve_model_dir(args.model_dir)
    images = query_images(src, args.images)
    vectors, ok = embed_images(model_dir, images)
    images, vectors = [im for im, o in zip(images, ok) if o], vectors[ok]
    print(f"index {src}: {gallery.ntotal} vectors, {gallery.dim}-d, {gallery.manifest['factory']}; "
          f"{len(images)} query images; load {machine_info()['load_average_1_5_15min']}", flush=True)
    rows = in_process(gallery, model_dir, vectors, images, args.k, args.requests)
    for r in rows:
        print(r, flush=True)

    cfg = config_from_args({"index_dir": str(index_dir), "model_dir": str(model_dir), "port": 0, "token": "", "access_log": False,
                            "embedder": {"max_batch_size": args.max_batch_size, "num_cpus": 0.5,
                                                 "threads": args.torch_threads},
                            "gallery": {"num_cpus": 0.5}})
    t0 = time.perf_counter()
    url = app.start(cfg)
    start_s = time.perf_counter() - t0
    print(f"service up at {url} in {start_s:.1f}s", flush=True)
    vector_bodies = [{"vectors": [v.tolist()], "k": args.k} for v in vectors]
    image_bodies = [{"images": [base64.b64encode(im).decode()], "k": args.k} for im in images]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    load = []
    try:
        asyncio.run(closed_loop(url, vector_bodies[:4] + image_bodies[:4], 2, 16, 30))  # warm-up
        for query, bodies in (("vector", vector_bodies), ("image", image_bodies)):
            for c in concurrencies:
                res = asyncio.run(closed_loop(url, bodies, c, args.requests, args.time_limit))
                res["load_average_1min"] = round(__import__("os").getloadavg()[0], 2)
                row = {"path": "HTTP (Serve)", "query": query, "concurrency": c, **res}
                if query == "image":  # cumulative model calls vs images: is @serve.batch batching?
                    row["embedder_batching"] = _get_json(url + "/info")["embedder"]["batching_of_one_replica"]
                print(row, flush=True)
                load.append(row)
        before = Gallery(index_dir).ntotal
        mix = asyncio.run(mixed(url, vector_bodies, gallery.dim, 8, 2, args.requests, args.time_limit))
        check = check_enrolments(index_dir, before, mix.pop("acked"))
        mix["check"] = check
        mix["load_average_1min"] = round(__import__("os").getloadavg()[0], 2)
        print({"mixed": mix}, flush=True)
    finally:
        app.stop()
    table = rows + load + [{"path": "HTTP mixed: 8 search + 2 enrol clients", "query": "vector", "concurrency": 10,
                            **{k: mix["search"][k] for k in ("requests", "req_per_s", "p50_ms", "p95_ms", "p99_ms")},
                            "statuses": {**mix["search"]["statuses"], **{f"enrol {k}": v for k, v in
                                                                        mix["enrol_statuses"].items()}}}]
    print_table(table, ["path", "query", "concurrency", "requests", "req_per_s", "p50_ms", "p95_ms", "p99_ms",
                        "statuses"])
    print(f"enrolments: {check}")
    five_xx = sum(v for r in load for s, v in r["statuses"].items() if int(s) >= 500)
    five_xx += sum(v for s, v in {**mix["search"]["statuses"], **mix["enrol_statuses"]}.items() if int(s) >= 500)
    path = write_results(args.name, {"index_dir": str(src), "model_dir": str(model_dir), "ntotal": gallery.ntotal,
                                     "dim": gallery.dim, "factory": gallery.manifest["factory"], "k": args.k,
                                     "service_start_s": round(start_s, 1), "in_process": rows, "http": load,
                                     "mixed": mix, "responses_5xx": five_xx,
                                     "settings": vars(args)})
    print(f"wrote {path}; 5xx responses: {five_xx}")
    shutil.rmtree(work, ignore_errors=True)
    if five_xx or not check["ok"]:
        raise SystemExit("FAILED: 5xx responses or lost/duplicated enrolments")


if __name__ == "__main__":
    main()
