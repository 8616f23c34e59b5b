"""The online service over real HTTP: Ray Serve's proxy on a free loopback port, one app start per module.

References are independent of the service: ``Gallery.search_identities`` and
``embed_images`` in this process, and brute-force numpy over the gallery's vectors.
"""

import base64
import concurrent.futures
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import requests

from reidscale.data.sources.synthetic import SyntheticConfig, generate
from reidscale.data.transforms import TransformConfig
from reidscale.index.build import build_index
from reidscale.index.gallery import Gallery
from reidscale.models.backbone import ModelConfig

REPO = Path(__file__).resolve().parents[1]
TINY = ModelConfig(width=32, layers=1, heads=2, patch_size=8, embed_dim=16)
SIZE = TransformConfig(height=32, width=16)
TOKEN = "test-token-8f3a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
N_RANDOM, N_CAMERAS = 240, 4


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny exported model, 8 JPEGs, and a gallery of their embeddings + random identities."""
    import torch

    from reidscale.embed import embed_images
    from reidscale.models.reid import build_reid_model, export_embedding_model

    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    model = build_reid_model(TINY, SIZE, num_classes=4)
    model_dir = export_embedding_model(model.embedding, TINY, SIZE, root / "model")
    records = [r for r in generate(SyntheticConfig(num_identities=8, train_fraction=0.5, height=32, width=16,
                                                   images_per_identity_median=4, max_images_per_identity=4))
               if r["split"] != "train"][:8]
    images = [r["image"] for r in records]
    image_vectors, ok = embed_images(model_dir, images)
    assert ok.all()
    rng = np.random.default_rng(0)
    centres = _unit(rng.standard_normal((N_RANDOM // 4, 16)))
    random_vectors = _unit(centres[np.repeat(np.arange(len(centres)), 4)] + 0.1 * rng.standard_normal((N_RANDOM, 16)))
    vectors = np.concatenate([image_vectors, random_vectors])
    identity = np.concatenate([[r["identity"] for r in records], 1000 + np.repeat(np.arange(len(centres)), 4)])
    meta = pa.table({"row_id": np.arange(len(vectors), dtype=np.int64), "identity": identity.astype(np.int64),
                     "camera": (np.arange(len(vectors)) % N_CAMERAS).astype(np.int32),
                     "path": [f"g{i}.jpg" for i in range(len(vectors))]})
    sha = json.loads((model_dir / "config.json").read_text())["weights_sha256"]
    index_dir = root / "index"
    build_index(vectors, meta, index_dir, factory="Flat", num_shards=2, model_sha256=sha,
                extra={"model_dir": str(model_dir)}, log=lambda *_: None)
    # the open-set threshold the way jobs/evaluate.py states it: genuine and impostor scores of
    # the gallery's own pairs, threshold at the impostor score exceeded by 1% of impostor pairs
    s = random_vectors @ random_vectors.T
    same = identity[8:, None] == identity[None, 8:]
    upper = np.triu(np.ones_like(same), 1)
    genuine, impostor = s[same & upper], s[~same & upper]
    threshold = float(np.quantile(impostor, 0.99))
    (index_dir / "open_set.json").write_text(json.dumps({
        "metric": "ip", "score_threshold": threshold, "target_far": 0.01,
        "tar_at_far": float((genuine >= threshold).mean()), "eer": None, "model_sha256": sha, "label": "test",
        "data_dir": "", "genuine_pairs": int(genuine.size), "impostor_pairs": int(impostor.size),
        "source": "test fixture: gallery pairs, FAR 1%"}))
    return {"model_dir": model_dir, "index_dir": index_dir, "images": images, "records": records,
            "vectors": vectors, "identity": identity, "threshold": threshold}


def _config(world, **kw):
    from reidscale.serve.config import config_from_args

    return config_from_args({"index_dir": str(world["index_dir"]), "port": 0, "token": TOKEN,
                             "max_image_mb": 0.05, "max_request_mb": 0.5,
                             "embedder": {"num_cpus": 0.25, "max_batch_size": 8, "threads": 1},
                             "gallery": {"num_cpus": 0.25, "refresh_s": 0.2}, **kw})


@pytest.fixture(scope="module")
def service(world):
    import ray

    from reidscale.serve import app

    url = app.start(_config(world))
    yield {"url": url, "app": app, "world": world}
    app.stop()
    ray.shutdown()


def post(service, path, body, **kw):
    # json.dumps writes NaN as Python does; a client may send it, so the tests do too
    return requests.post(service["url"] + path, data=json.dumps(body), timeout=60,
                         headers={**AUTH, "Content-Type": "application/json"}, **kw)


def _search_equals_gallery(service, world, rows: list[int], seed: int) -> None:
    """POST /search of noisy copies of gallery ``rows`` answers what ``Gallery.search_identities`` does."""
    queries = _unit(world["vectors"][rows] + 0.05 * np.random.default_rng(seed).standard_normal((len(rows), 16)))
    r = post(service, "/search", {"vectors": queries.tolist(), "k": 5})
    assert r.status_code == 200, r.text
    gallery = Gallery(world["index_dir"])
    ident, score, row = gallery.search_identities(queries, 5)
    for q, result in enumerate(r.json()["results"]):
        assert [m["identity"] for m in result["matches"]] == ident[q].tolist()
        assert [m["row_id"] for m in result["matches"]] == row[q].tolist()
        np.testing.assert_allclose([m["score"] for m in result["matches"]], score[q], atol=1e-5)
        # rows enrolled by earlier tests (camera -1 when none was given) may be among the hits
        assert [m["camera"] for m in result["matches"]] == gallery.cameras(row[q]).tolist()
        assert [m["path"] for m in result["matches"]] == gallery.paths(row[q]).tolist()


def test_vector_search_equals_gallery_search_identities(service, world):
    _search_equals_gallery(service, world, [3, 20, 100], seed=1)
    # first in the module, before any enrolment: every hit is a built row, camera = row % N_CAMERAS
    r = post(service, "/search", {"vectors": world["vectors"][[3, 20, 100]].tolist(), "k": 5}).json()
    assert all(m["camera"] == m["row_id"] % N_CAMERAS for q in r["results"] for m in q["matches"])


def test_image_search_equals_in_process_embedding_then_gallery(service, world):
    from reidscale.embed import embed_images

    images = world["images"][:5]
    r = post(service, "/search", {"images": [_b64(b) for b in images], "k": 3})
    assert r.status_code == 200, r.text
    queries, _ = embed_images(world["model_dir"], images)
    ident, score, _ = Gallery(world["index_dir"]).search_identities(queries, 3)
    results = r.json()["results"]
    assert [[m["identity"] for m in q["matches"]] for q in results] == ident.tolist()
    np.testing.assert_allclose([[m["score"] for m in q["matches"]] for q in results], score, atol=1e-4)
    # each image is in the gallery: its own identity first, score ~1, not new
    assert [q["matches"][0]["identity"] for q in results] == [rec["identity"] for rec in world["records"][:5]]
    assert not any(q["is_new"] for q in results)


def test_camera_filters_equal_brute_force(service, world):
    x, identity = world["vectors"], world["identity"]
    camera = np.arange(len(x)) % N_CAMERAS
    query = x[50:51]
    for body, keep in [({"cameras": [1, 2]}, np.isin(camera, [1, 2])), ({"exclude_camera": 2}, camera != 2)]:
        r = post(service, "/search", {"vectors": query.tolist(), "k": 4, **body})
        assert r.status_code == 200, r.text
        scores = np.where(keep, x @ query[0], -np.inf)
        expect = []
        for i in np.argsort(-scores, kind="stable"):
            if identity[i] not in expect:
                expect.append(int(identity[i]))
        matches = r.json()["results"][0]["matches"]
        assert [m["identity"] for m in matches] == expect[:4]
        assert all(keep[m["row_id"]] for m in matches)


def test_open_set_threshold_comes_from_open_set_json(service, world):
    info = requests.get(service["url"] + "/info", headers=AUTH, timeout=30).json()
    assert info["score_threshold"] == pytest.approx(world["threshold"])
    assert "open_set.json" in info["threshold_source"] and "FAR 1%" in info["threshold_source"]
    assert info["model"]["weights_sha256"] == Gallery(world["index_dir"]).manifest["model_sha256"]
    live_identity, _ = Gallery(world["index_dir"]).live_labels()
    assert info["identities"] == len(set(live_identity.tolist())) and info["vectors"] == live_identity.size
    # a direction far from every gallery vector: the random one whose best match is worst
    candidates = _unit(np.random.default_rng(3).standard_normal((2000, 16)))
    far = candidates[np.argmin((candidates @ world["vectors"].T).max(1))]
    assert (world["vectors"] @ far).max() < world["threshold"]  # precondition of the check below
    r = post(service, "/search", {"vectors": [world["vectors"][10].tolist(), far.tolist()], "k": 1}).json()
    best = [q["matches"][0]["score"] for q in r["results"]]
    assert [q["is_new"] for q in r["results"]] == [b < world["threshold"] for b in best] == [False, True]


def test_enrol_new_identity_is_found_and_delete_removes_it(service, world):
    rng = np.random.default_rng(7)
    v = _unit(rng.standard_normal((2, 16)))
    r = post(service, "/enrol", {"vectors": v.tolist(), "identity": "new", "cameras": [3, 3]})
    assert r.status_code == 200, r.text
    enrolled = r.json()
    assert enrolled["identity"] > int(world["identity"].max())
    found = post(service, "/search", {"vectors": v[:1].tolist(), "k": 1}).json()
    assert found["results"][0]["matches"][0]["identity"] == enrolled["identity"]
    assert found["results"][0]["matches"][0]["row_id"] == enrolled["row_ids"][0]
    assert found["generation"] >= enrolled["generation"]
    # an image enrolment under a known id, found by the same image
    image = world["images"][6]
    r = post(service, "/enrol", {"images": [_b64(image)], "identity": 5555, "paths": ["probe.jpg"]})
    assert r.status_code == 200, r.text
    hit = post(service, "/search", {"images": [_b64(image)], "k": 2, "cameras": [-1]}).json()
    assert hit["results"][0]["matches"][0]["identity"] == 5555
    assert hit["results"][0]["matches"][0]["path"] == "probe.jpg"
    gone = requests.delete(service["url"] + "/rows", json={"row_ids": enrolled["row_ids"][:1]}, headers=AUTH,
                           timeout=30)
    assert gone.status_code == 200 and gone.json()["removed"] == 1
    rows = post(service, "/search", {"vectors": v[:1].tolist(), "k": 50}).json()["results"][0]["matches"]
    assert enrolled["row_ids"][0] not in [m["row_id"] for m in rows]
    gone = requests.delete(service["url"] + f"/identities/{enrolled['identity']}", headers=AUTH, timeout=30)
    assert gone.status_code == 200 and gone.json()["removed"] == 1
    rows = post(service, "/search", {"vectors": v.tolist(), "k": 50}).json()["results"]
    assert all(m["identity"] != enrolled["identity"] for q in rows for m in q["matches"])
    again = requests.delete(service["url"] + f"/identities/{enrolled['identity']}", headers=AUTH, timeout=30)
    assert again.status_code == 404 and "no live rows" in again.json()["detail"]


def test_concurrent_new_enrolments_get_distinct_identities_and_all_rows(service, world):
    v = _unit(np.random.default_rng(8).standard_normal((12, 16)))
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        out = list(pool.map(lambda i: post(service, "/enrol", {"vectors": [v[i].tolist()], "identity": "new"}),
                            range(12)))
    assert all(r.status_code == 200 for r in out), [r.text for r in out]
    bodies = [r.json() for r in out]
    assert len({b["identity"] for b in bodies}) == 12
    assert len({b["row_ids"][0] for b in bodies}) == 12
    gallery = Gallery(world["index_dir"])
    ident, _, row = gallery.search_identities(v, 1)
    assert ident[:, 0].tolist() == [b["identity"] for b in bodies]
    assert row[:, 0].tolist() == [b["row_ids"][0] for b in bodies]


@pytest.mark.parametrize("path,body,status,message", [
    ("/search", {"images": [_b64(b"definitely not an image")], "k": 1}, 422, "images[0]: not a decodable image"),
    ("/search", {"images": ["%%%"], "k": 1}, 422, "images[0]: not valid base64"),
    ("/search", {"images": [_b64(b"\xff" * 60_000)], "k": 1}, 413, "images[0]"),
    ("/search", {"vectors": [[0.25] * 15], "k": 1}, 422, "vectors[0]: 15 values"),
    ("/search", {"vectors": [[1.0] + [0.0] * 15, [float("nan")] * 16], "k": 1}, 422, "vectors[1]: holds NaN"),
    ("/search", {"vectors": [[1.0] * 16], "k": 1}, 422, "vectors[0]: norm 4"),
    ("/search", {"vectors": [[1.0] + [0.0] * 15], "k": 0}, 422, "k: 0"),
    ("/search", {"vectors": [[1.0] + [0.0] * 15], "k": "ten"}, 422, "k:"),
    ("/search", {"k": 3}, 422, "exactly one of images or vectors"),
    ("/enrol", {"vectors": [[1.0] + [0.0] * 15], "identity": -4}, 422, "identity: -4"),
    ("/enrol", {"vectors": [[1.0] + [0.0] * 15], "identity": 1, "cameras": [0, 1]}, 422, "cameras: 2 camera ids"),
    # beyond the int64/int32 columns they are stored in: a 422, not numpy's OverflowError as a 500
    ("/enrol", {"vectors": [[1.0] + [0.0] * 15], "identity": 2**64}, 422, "identity"),
    ("/search", {"vectors": [[1.0] + [0.0] * 15], "k": 1, "cameras": [2**40]}, 422, "cameras.0"),
])
def test_bad_input_gets_4xx_with_a_message_and_changes_nothing(service, world, path, body, status, message):
    before = requests.get(service["url"] + "/health", timeout=30).json()["generation"]
    r = post(service, path, body)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"] and "\n" not in r.json()["detail"]
    assert requests.get(service["url"] + "/health", timeout=30).json() == {"status": "ok", "generation": before}


def test_row_ids_and_identities_beyond_int64_are_refused_not_a_server_error(service):
    before = requests.get(service["url"] + "/health", timeout=30).json()
    r = requests.delete(service["url"] + "/rows", json={"row_ids": [1, 2**64]}, headers=AUTH, timeout=30)
    assert r.status_code == 422 and r.json()["detail"].startswith("row_ids.1:"), r.text
    r = requests.delete(service["url"] + f"/identities/{2**64}", headers=AUTH, timeout=30)
    assert r.status_code == 422 and "identity" in r.json()["detail"], r.text
    assert requests.get(service["url"] + "/health", timeout=30).json() == before


def test_oversized_request_body_is_refused_before_parsing(service):
    r = requests.post(service["url"] + "/search", data=b"[" + b"0," * 400_000 + b"0]", headers=AUTH, timeout=30)
    assert r.status_code == 413 and "max_request_mb" in r.json()["detail"]


def test_bearer_token_is_required_except_for_health_and_openapi(service):
    url = service["url"]
    assert requests.post(url + "/search", json={"vectors": [[1.0] + [0.0] * 15]}, timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert requests.get(url + "/info", headers=wrong, timeout=30).status_code == 401
    assert requests.get(url + "/health", timeout=30).status_code == 200
    schema = requests.get(url + "/openapi.json", timeout=30).json()
    assert {"/search", "/enrol", "/rows", "/identities/{identity}", "/health", "/info"} <= set(schema["paths"])
    assert "SearchRequest" in schema["components"]["schemas"]


def test_restart_keeps_every_acknowledged_enrolment(service, world):
    v = _unit(np.random.default_rng(9).standard_normal((3, 16)))
    enrolled = post(service, "/enrol", {"vectors": v.tolist(), "identity": 7777}).json()
    app = service["app"]
    pid = requests.get(service["url"] + "/info", headers=AUTH, timeout=30).json()["gallery_pid"]
    # every replica (embedder, gallery, ingress) replaced: new processes open the index from disk
    app.redeploy(_config(world))
    r = post(service, "/search", {"vectors": v.tolist(), "k": 1}).json()
    assert [q["matches"][0]["row_id"] for q in r["results"]] == enrolled["row_ids"]
    assert r["generation"] == enrolled["generation"]
    assert requests.get(service["url"] + "/info", headers=AUTH, timeout=30).json()["gallery_pid"] != pid


def test_the_service_on_shard_actors_answers_as_the_gallery_and_enrols(service, world):
    """``gallery.distributed=true``: the gallery replica serves from DistributedGallery's shard
    actors; answers equal the single-process Gallery's, and an enrolment reaches the actors."""
    app = service["app"]
    # the actors map their shards from disk (gallery.mmap): the answers must not change
    distributed = {"num_cpus": 0.25, "refresh_s": 0.2, "distributed": True, "actors": 2, "actor_cpus": 0.25,
                   "mmap": True}
    app.redeploy(_config(world, gallery=distributed))
    try:
        info = requests.get(service["url"] + "/info", headers=AUTH, timeout=30).json()
        assert info["shard_actors"] == 2
        _search_equals_gallery(service, world, [2, 50, 150], seed=4)
        v = _unit(np.random.default_rng(11).standard_normal((2, 16)))
        enrolled = post(service, "/enrol", {"vectors": v.tolist(), "identity": "new"}).json()
        found = post(service, "/search", {"vectors": v.tolist(), "k": 1}).json()
        assert [q["matches"][0]["row_id"] for q in found["results"]] == enrolled["row_ids"]
        assert {q["matches"][0]["identity"] for q in found["results"]} == {enrolled["identity"]}
    finally:
        app.redeploy(_config(world))
    assert requests.get(service["url"] + "/info", headers=AUTH, timeout=30).json()["shard_actors"] == 0


def test_serve_job_takes_its_token_from_the_environment_and_stops_cleanly_on_sigterm(world, tmp_path):
    """``jobs/serve.py`` as a user starts it: one command on an index (its model found through the
    index), the token from REIDSCALE_SERVE_TOKEN, SIGTERM stops it: exit 0 and the port closed."""
    index_dir = tmp_path / "index"
    shutil.copytree(world["index_dir"], index_dir)
    env = {**os.environ, "REIDSCALE_SERVE_TOKEN": "env-token-5c1d"}
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "serve.py"), f"index_dir={index_dir}", "port=0",
                                 "embedder.num_cpus=0.25", "gallery.num_cpus=0.25"],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=tmp_path)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        url = None
        while url is None:
            line = lines.get(timeout=240)  # Ray + Serve + three replicas start in ~40 s here
            if line.startswith("{"):
                url = json.loads(line)["url"]
        assert url.startswith("http://127.0.0.1:")
        query = world["vectors"][[5]]
        assert requests.post(url + "/search", json={"vectors": query.tolist(), "k": 1}, timeout=60).status_code == 401
        r = requests.post(url + "/search", json={"vectors": query.tolist(), "k": 3}, timeout=60,
                          headers={"Authorization": "Bearer env-token-5c1d"})
        assert r.status_code == 200, r.text
        ident, _, _ = Gallery(index_dir).search_identities(query, 3)
        assert [m["identity"] for m in r.json()["results"][0]["matches"]] == ident[0].tolist()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, (tmp_path / "stderr.txt").read_text()[-2000:]
        with pytest.raises(requests.ConnectionError):
            requests.get(url + "/health", timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
