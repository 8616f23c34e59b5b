"""The service's parts without Ray: config, open-set threshold resolution, request checks, camera filters."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from reidscale.config import ConfigError
from reidscale.index.build import build_index
from reidscale.index.gallery import Gallery
from reidscale.serve import schema
from reidscale.serve.config import EmbedderConfig, GalleryServeConfig, ServeConfig, config_from_args
from reidscale.serve.gallery import GalleryService, search_filtered
from reidscale.serve.openset import resolve_threshold

REPO = Path(__file__).resolve().parents[1]


def _index(path, n=120, d=8, metric="ip", sha="abc123"):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    meta = pa.table({"row_id": np.arange(n, dtype=np.int64), "identity": (np.arange(n) // 3).astype(np.int64),
                     "camera": (np.arange(n) % 5).astype(np.int32), "path": [f"{i}.jpg" for i in range(n)]})
    build_index(x, meta, path, factory="Flat", metric=metric, model_sha256=sha, log=lambda *_: None)
    return x, meta


def test_camera_filtered_search_equals_brute_force_and_deepens_past_the_first_fetch(tmp_path):
    x, meta = _index(tmp_path)
    gallery = Gallery(tmp_path)
    identity, camera = meta.column("identity").to_numpy(), meta.column("camera").to_numpy()
    q = x[:4]
    # cameras=[4] keeps 1 row in 5: k=10 identities need more than the first 8k fetched
    for kw, keep in [({"cameras": [4]}, camera == 4), ({"exclude_camera": 0}, camera != 0)]:
        ident, score, row = search_filtered(gallery, q, 10, **kw)
        for i in range(len(q)):
            s = np.where(keep, x @ q[i], -np.inf)
            expect = []
            for j in np.argsort(-s, kind="stable"):
                if keep[j] and identity[j] not in expect:
                    expect.append(identity[j])
            assert ident[i].tolist() == expect[:10]
            np.testing.assert_allclose(score[i], (x @ q[i])[row[i]], atol=1e-5)
    ident, _, _ = search_filtered(gallery, q, 3, cameras=[99])
    assert (ident == -1).all()


def test_new_identities_never_reuse_a_removed_ones_id(tmp_path):
    x, meta = _index(tmp_path)
    service = GalleryService(str(tmp_path))
    top = int(meta.column("identity").to_numpy().max())
    assert service.remove_identity(top)["removed"] == 3
    first = service.enrol(x[:1], None)
    second = service.enrol(x[1:2], None)
    assert (first["identity"], second["identity"]) == (top + 1, top + 2)
    assert Gallery(tmp_path).identities(np.asarray(second["row_ids"])).tolist() == [top + 2]


def _open_set(path, **kw):
    body = {"metric": "ip", "score_threshold": 0.42, "target_far": 0.001, "model_sha256": "abc123",
            "source": "jobs/evaluate.py on runs/demo/data (query vs gallery)", **kw}
    (path / "open_set.json").write_text(json.dumps(body))


def test_threshold_from_open_set_json_config_overrides_and_mismatches_are_refused(tmp_path):
    _index(tmp_path)
    manifest = Gallery(tmp_path).manifest
    none = resolve_threshold(tmp_path, manifest, None)
    assert none.value is None and none.source.startswith("none") and none.is_new(np.ones(2), np.ones(2)) == [None] * 2
    _open_set(tmp_path)
    t = resolve_threshold(tmp_path, manifest, None)
    assert t.value == 0.42 and "jobs/evaluate.py" in t.source and "0.001" in t.source
    assert t.is_new(np.array([0.5, 0.3, 0.9]), np.array([1, 1, -1])) == [False, True, True]
    assert resolve_threshold(tmp_path, manifest, 0.8).source == "score_threshold from the service config"
    _open_set(tmp_path, model_sha256="other")
    with pytest.raises(ValueError, match="threshold of model other"):
        resolve_threshold(tmp_path, manifest, None)
    _open_set(tmp_path, metric="l2")
    with pytest.raises(ValueError, match="metric 'l2'"):
        resolve_threshold(tmp_path, manifest, None)
    _open_set(tmp_path, score_threshold=float("nan"))
    with pytest.raises(ValueError, match="not a finite number"):
        resolve_threshold(tmp_path, manifest, None)


def test_l2_threshold_means_same_identity_at_or_below_it(tmp_path):
    _index(tmp_path, metric="l2")
    t = resolve_threshold(tmp_path, Gallery(tmp_path).manifest, 0.5)
    assert t.is_new(np.array([0.4, 0.6]), np.array([3, 3])) == [False, True]


def test_request_checks_name_the_item():
    with pytest.raises(schema.InputError, match=r"vectors\[1\]: holds NaN"):
        schema.check_vectors([[1.0, 0.0], [np.nan, 0.0]], 2, "ip")
    with pytest.raises(schema.InputError, match=r"vectors\[0\]: norm 2"):
        schema.check_vectors([[2.0, 0.0]], 2, "ip")
    assert schema.check_vectors([[2.0, 0.0]], 2, "l2").dtype == np.float32  # l2 galleries need not be unit
    with pytest.raises(schema.InputError) as big:
        schema.decode_images(["QUJD" * 100], max_bytes=100)
    assert big.value.status == 413
    with pytest.raises(schema.InputError, match="limit is max_items=2") as many:
        schema.one_source(None, [[1.0]] * 3, max_items=2)
    assert many.value.status == 413


def test_config_refuses_bad_values_naming_the_key(tmp_path):
    _index(tmp_path)
    cfg = config_from_args({"index_dir": str(tmp_path), "embedder": {"replicas": 2}, "gallery": {"search_params": {"nprobe": 8}}})
    assert cfg.host == "127.0.0.1" and cfg.embedder.replicas == 2 and cfg.gallery.search_params == {"nprobe": 8}
    with pytest.raises(ConfigError, match="embedder.max_batch_size"):
        config_from_args({"index_dir": str(tmp_path), "embedder": {"max_batch_size": 0}})
    with pytest.raises(ConfigError, match="no manifest.json"):
        config_from_args({"index_dir": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="gallery.replicas: 2 with distributed=true"):
        config_from_args({"index_dir": str(tmp_path), "gallery": {"distributed": True, "replicas": 2}})
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "serve.py"), f"index_dir={tmp_path}", "port=70000"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "port: 70000" in proc.stderr


def test_gallery_section_builds_the_service_it_names(tmp_path):
    x, _ = _index(tmp_path)
    default = GalleryService(str(tmp_path), **config_from_args({"index_dir": str(tmp_path)}).gallery.service_options())
    cfg = config_from_args({"index_dir": str(tmp_path),
                            "gallery": {"mmap": True, "verify": False, "refresh_s": 7}})
    mapped = GalleryService(str(tmp_path), **cfg.gallery.service_options())
    assert not default.gallery.mmap and default.gallery.verify
    assert mapped.gallery.mmap and not mapped.gallery.verify and mapped.refresh_s == 7
    for a, b in zip(mapped.gallery.search(x[:5], 4), default.gallery.search(x[:5], 4)):
        np.testing.assert_array_equal(a, b)
    distributed = config_from_args({"index_dir": str(tmp_path), "gallery": {"distributed": True, "actors": 3,
                                                                            "actor_cpus": 0.5}})
    assert distributed.gallery.service_options()["distributed"] == {"num_actors": 3, "actor_cpus": 0.5}


def test_serve_config_files_are_valid_serve_and_service_configs():
    from ray.serve.schema import ServeDeploySchema

    cluster = yaml.safe_load((REPO / "configs" / "serve" / "cluster.yaml").read_text())
    schema_ = ServeDeploySchema.model_validate(cluster) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(cluster)
    app = schema_.applications[0]
    assert app.import_path == "reidscale.serve.app:app_builder"
    assert schema_.http_options.host == "127.0.0.1"
    fields = set(ServeConfig.__dataclass_fields__)
    assert set(app.args) <= fields
    local = yaml.safe_load((REPO / "configs" / "serve" / "local.yaml").read_text())
    # the README says local.yaml lists every key: every field of the config and of its sections
    assert set(local) == fields and local["host"] == "127.0.0.1"
    assert set(local["embedder"]) == set(EmbedderConfig.__dataclass_fields__)
    assert set(local["gallery"]) == set(GalleryServeConfig.__dataclass_fields__)


def _export(path, seed=0, **model_kw):
    from dataclasses import replace

    import torch

    from reidscale.data.transforms import TransformConfig
    from reidscale.models.backbone import ModelConfig
    from reidscale.models.reid import build_reid_model, export_embedding_model

    cfg = replace(ModelConfig(width=32, layers=1, heads=2, patch_size=8, embed_dim=8), **model_kw)
    size = TransformConfig(height=32, width=16)
    torch.manual_seed(seed)
    model = build_reid_model(cfg, size, num_classes=4)
    if cfg.sie_cameras:
        with torch.no_grad():  # SIE rows start near zero; make cameras clearly different
            model.embedding.backbone.sie_embed.normal_()
    return export_embedding_model(model.embedding, cfg, size, path)


def _jpegs(n):
    from reidscale.data.sources.synthetic import SyntheticConfig, generate

    records = generate(SyntheticConfig(num_identities=4, train_fraction=0.5, height=32, width=16,
                                       images_per_identity_median=4, max_images_per_identity=4))
    return [r["image"] for r in records][:n]


def test_service_embedder_equals_in_process_embedding_with_sie_cameras(tmp_path):
    from reidscale.embed import embed_images
    from reidscale.serve.embedder import ImageEmbedder, model_summary

    export = _export(tmp_path / "sie", sie_cameras=3)
    images = _jpegs(4)
    out = ImageEmbedder(str(export))(images + [b"not an image"], cameras=[0, 1, 2, 0, 1])
    assert out[-1] is None
    ref, _ = embed_images(export, images, cameras=[0, 1, 2, 0])
    np.testing.assert_allclose(np.stack(out[:4]), ref, atol=1e-5)
    assert model_summary(export)["sie_cameras"] == 3


def test_plan_refuses_a_model_the_index_was_not_built_with(tmp_path):
    from reidscale.serve.app import plan

    export = _export(tmp_path / "model")
    other = _export(tmp_path / "other", seed=1)
    sha = json.loads((export / "config.json").read_text())["weights_sha256"]
    _index(tmp_path / "index", sha=sha)
    cfg = config_from_args({"index_dir": str(tmp_path / "index"), "model_dir": str(export), "score_threshold": 0.5})
    p = plan(cfg)
    assert p["model"]["weights_sha256"] == sha and p["threshold"]["value"] == 0.5 and p["index_dir"].startswith("/")
    with pytest.raises(ValueError, match="not the model this index was built with"):
        plan(config_from_args({"index_dir": str(tmp_path / "index"), "model_dir": str(other)}))
    vectors_only = plan(config_from_args({"index_dir": str(tmp_path / "index"), "model_dir": "none"}))
    assert vectors_only["model"] is None and vectors_only["threshold"]["value"] is None


def test_plan_finds_the_model_an_index_recorded_relative_to_itself_from_any_working_directory(tmp_path,
                                                                                                monkeypatch):
    # as build_index records it: "../../models/trained" from <run>/index/trained
    from reidscale.serve.app import plan

    run = tmp_path / "run"
    export = _export(run / "models" / "trained")
    sha = json.loads((export / "config.json").read_text())["weights_sha256"]
    x, meta = _index(tmp_path / "scratch", sha=sha)
    build_index(x, meta, run / "index" / "trained", factory="Flat", model_sha256=sha, model_dir=export,
                log=lambda *_: None)
    assert json.loads((run / "index" / "trained" / "manifest.json").read_text())["model_dir"] == "../../models/trained"
    monkeypatch.chdir(tmp_path)  # not the run directory: the path is relative to the index, not the cwd
    p = plan(config_from_args({"index_dir": str(run / "index" / "trained"), "score_threshold": 0.5}))
    assert p["model"]["model_dir"] == str(export.resolve()) and p["model"]["weights_sha256"] == sha


def test_searches_during_enrolments_answer_from_the_generation_they_report(tmp_path):
    """A search that reports generation >= g sees what g added; one that reports < g does not."""
    import threading
    import time

    _index(tmp_path, n=60, d=8)
    service = GalleryService(str(tmp_path), refresh_s=1e9)
    rng = np.random.default_rng(5)
    new = rng.standard_normal((15, 8)).astype(np.float32)
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    acked, seen, done = {}, [], threading.Event()

    def search():
        while not done.is_set():
            i = int(rng.integers(len(new)))
            r = service.search(new[i : i + 1], 1)
            seen.append((i, r["generation"], int(r["row_id"][0, 0])))

    readers = [threading.Thread(target=search) for _ in range(2)]
    for t in readers:
        t.start()
    for i in range(len(new)):
        out = service.enrol(new[i : i + 1], None)
        acked[i] = (out["generation"], out["row_ids"][0])
        time.sleep(0.01)  # writers go first under the lock; a pause lets searches interleave
    done.set()
    for t in readers:
        t.join()
    assert len(seen) > 10
    for i, generation, row in seen:
        if i in acked and generation >= acked[i][0]:
            assert row == acked[i][1]
        elif i in acked:
            assert row != acked[i][1]


def _asgi(guard_settings: dict, path: str, chunks: list[bytes], headers: dict[bytes, bytes]):
    """Drive ``serve.guard.Guard`` around an app that echoes the body it read; (status, body)."""
    import asyncio

    from reidscale.serve.guard import Guard

    async def echo(scope, receive, send):
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    incoming = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent = []

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": path, "root_path": "", "headers": list(headers.items())}
    asyncio.run(Guard(echo, guard_settings)(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_guard_checks_the_token_and_the_body_size_before_the_app_reads_it():
    settings = {"token": "s3cret", "max_request_bytes": 10}
    auth = {b"authorization": b"Bearer s3cret"}
    assert _asgi(settings, "/search", [b"{}"], {})[0] == 401
    assert _asgi(settings, "/search", [b"{}"], {b"authorization": b"Bearer wrong"})[0] == 401
    assert _asgi(settings, "/health", [b""], {}) == (200, b"")  # liveness needs no token
    status, body = _asgi(settings, "/search", [b"x" * 11], {**auth, b"content-length": b"11"})
    assert status == 413 and "11 bytes, over the 10 byte limit" in json.loads(body)["detail"]
    # chunked: no content-length, refused once the chunks pass the limit
    assert _asgi(settings, "/search", [b"x" * 6, b"y" * 6], auth)[0] == 413
    # under the limit, the app reads the whole body, replayed intact
    assert _asgi(settings, "/search", [b"abc", b"defg"], auth) == (200, b"abcdefg")
    assert _asgi({"max_request_bytes": 10}, "/search", [b"abc"], {}) == (200, b"abc")  # no token configured


def test_sie_cameras_are_required_and_in_range_for_an_sie_model():
    schema.check_sie_cameras(None, 0, "cameras")  # no SIE: cameras are not needed
    schema.check_sie_cameras([0, 2], 3, "cameras")
    with pytest.raises(schema.InputError, match=r"cameras: the model uses camera SIE \(3 cameras\)"):
        schema.check_sie_cameras(None, 3, "cameras")
    with pytest.raises(schema.InputError, match=r"query_cameras\[1\]: camera 3 outside \[0, 3\)"):
        schema.check_sie_cameras([0, 3], 3, "query_cameras")
