"""The index jobs: search job output, precomputed-vector builds, adding images with the index's model."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reidscale.data.sources.synthetic import SyntheticConfig, generate
from reidscale.data.transforms import TransformConfig
from reidscale.index.build import build_index
from reidscale.index.gallery import Gallery
from reidscale.index.search import SearchJobConfig, run_search
from reidscale.models.backbone import ModelConfig

REPO = Path(__file__).resolve().parents[1]
TINY = ModelConfig(width=32, layers=1, heads=2, patch_size=8, embed_dim=16)
SIZE = TransformConfig(height=32, width=16)


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _vector_index(path, n_ids=50, per_id=4, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((n_ids, d)))
    identity = np.repeat(np.arange(n_ids), per_id)
    x = _unit(centres[identity] + 0.05 * rng.standard_normal((len(identity), d)))
    meta = pa.table({"row_id": np.arange(len(x), dtype=np.int64), "identity": identity.astype(np.int64) + 100,
                     "camera": (np.arange(len(x)) % 3).astype(np.int32), "path": [f"img{i}.jpg" for i in range(len(x))]})
    build_index(x, meta, path, factory="Flat", num_shards=2, log=lambda *_: None)
    return centres


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch

    from reidscale.models.reid import build_reid_model, export_embedding_model

    torch.manual_seed(0)
    model = build_reid_model(TINY, SIZE, num_classes=4)
    model.eval()
    return export_embedding_model(model.embedding, TINY, SIZE, tmp_path_factory.mktemp("model") / "export")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Six JPEG files of three synthetic identities."""
    out = tmp_path_factory.mktemp("images")
    records = list(generate(SyntheticConfig(num_identities=6, train_fraction=0.5, height=32, width=16,
                                            images_per_identity_median=4, max_images_per_identity=4)))
    paths, identities = [], []
    for rec in [r for r in records if r["split"] != "train"][:6]:
        path = out / Path(rec["path"]).name
        path.write_bytes(rec["image"])
        paths.append(str(path))
        identities.append(rec["identity"])
    return paths, identities


def test_search_job_writes_topk_distinct_identities_as_json(tmp_path):
    centres = _vector_index(tmp_path / "index")
    np.save(tmp_path / "q.npy", centres[[3, 7]])
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "search.py"), f"index_dir={tmp_path / 'index'}",
                           f"vectors={tmp_path / 'q.npy'}", "k=5", "format=json", f"out={tmp_path / 'r.json'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    assert printed == json.loads((tmp_path / "r.json").read_text())
    assert printed["distance"] == "cosine" and printed["num_queries"] == 2
    for result, expected in zip(printed["results"], [103, 107]):
        matches = result["matches"]
        assert [m["rank"] for m in matches] == [1, 2, 3, 4, 5]
        assert matches[0]["identity"] == expected and matches[0]["distance"] < 0.05
        assert len({m["identity"] for m in matches}) == 5  # distinct identities
        assert [m["distance"] for m in matches] == sorted(m["distance"] for m in matches)
        assert matches[0]["path"].startswith("img")


def test_search_job_prints_a_table_of_images(tmp_path, capsys):
    centres = _vector_index(tmp_path / "index")
    np.save(tmp_path / "q.npy", centres[[5]])
    summary = run_search(SearchJobConfig(index_dir=str(tmp_path / "index"), vectors=str(tmp_path / "q.npy"), k=4,
                                         distinct_identities=False))
    assert summary["num_queries"] == 1
    out = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in out[1:5]]
    assert [r[-4] for r in rows] == ["105"] * 4  # the identity's four images come first
    assert "1 queries, top 4 images, cosine distance" in out[5]


def test_search_job_refuses_two_query_sources(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "search.py"), f"index_dir={tmp_path}",
                           "images=a.jpg", f"vectors={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "exactly one source" in proc.stderr


def test_query_images_are_embedded_with_the_index_model(tmp_path, tiny_model, images):
    from reidscale.embed import embed_images

    paths, identities = images
    vectors, ok = embed_images(tiny_model, paths)
    assert ok.all() and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    meta = pa.table({"row_id": np.arange(6, dtype=np.int64), "identity": np.asarray(identities, np.int64),
                     "camera": np.zeros(6, np.int32), "path": paths})
    sha = json.loads((tiny_model / "config.json").read_text())["weights_sha256"]
    build_index(vectors, meta, tmp_path, factory="Flat", model_sha256=sha, extra={"model_dir": str(tiny_model)},
                log=lambda *_: None)
    summary = run_search(SearchJobConfig(index_dir=str(tmp_path), images=paths[:2], k=1, format="json"))
    for result, path, identity in zip(summary["results"], paths, identities):
        assert result["query"] == path
        assert result["matches"][0]["identity"] == identity and result["matches"][0]["distance"] < 1e-5


@pytest.mark.parametrize("reader", ["gallery", "shard actors"])
def test_gallery_add_images_uses_the_manifest_model_and_refuses_another(tmp_path, tiny_model, images, reader):
    """``Gallery.add(images=)`` and the same through ``DistributedGallery`` (the images embedded in
    the client, the shard on an actor that maps it from disk)."""
    import torch

    from reidscale.embed import embed_images
    from reidscale.models.reid import build_reid_model, export_embedding_model

    paths, _ = images
    vectors, _ = embed_images(tiny_model, paths[:3])
    meta = pa.table({"row_id": np.arange(3, dtype=np.int64), "identity": np.arange(3, dtype=np.int64),
                     "camera": np.zeros(3, np.int32), "path": paths[:3]})
    sha = json.loads((tiny_model / "config.json").read_text())["weights_sha256"]
    build_index(vectors, meta, tmp_path, factory="Flat", model_sha256=sha, model_dir=tiny_model, log=lambda *_: None)
    if reader == "gallery":
        gallery = Gallery(tmp_path)
    else:
        from reidscale.index.distributed import DistributedGallery

        gallery = DistributedGallery(tmp_path, num_actors=1, actor_cpus=0.5, mmap=True)
    try:
        ids = gallery.add(images=paths[3:], identities=[900, 901, 902], cameras=[1, 1, 1])
        assert gallery.paths(ids).tolist() == paths[3:] and gallery.ntotal == 6
        query, _ = embed_images(tiny_model, paths[4:5])
        identity, _, row = gallery.search_identities(query, 1)
        assert identity[0, 0] == 901 and row[0, 0] == ids[1]
        with pytest.raises(ValueError, match="do not decode"):
            gallery.add(images=[b"not an image"], identities=[1])
        with pytest.raises(ValueError, match="exactly one of vectors or images"):
            gallery.add(vectors, [1, 2, 3], images=paths[:3])
        torch.manual_seed(1)
        other = export_embedding_model(build_reid_model(TINY, SIZE, 4).embedding, TINY, SIZE, tmp_path / "other")
        with pytest.raises(ValueError, match="not the model this index was built with"):
            gallery.add(images=paths[:1], identities=[1], model_dir=other)
    finally:
        if reader != "gallery":
            import ray

            gallery.close()
            ray.shutdown()


def test_copied_index_and_model_find_each_other_and_a_changed_model_is_refused(tmp_path, tiny_model, images):
    import shutil

    from reidscale.embed import embed_images

    paths, _ = images
    site = tmp_path / "site"
    shutil.copytree(tiny_model, site / "models" / "trained")
    vectors, _ = embed_images(site / "models" / "trained", paths[:3])
    meta = pa.table({"row_id": np.arange(3, dtype=np.int64), "identity": np.arange(3, dtype=np.int64),
                     "camera": np.zeros(3, np.int32), "path": paths[:3]})
    sha = json.loads((tiny_model / "config.json").read_text())["weights_sha256"]
    manifest = build_index(vectors, meta, site / "index" / "g", factory="Flat", model_sha256=sha,
                           model_dir=site / "models" / "trained", log=lambda *_: None)
    assert manifest["model_dir"] == "../../models/trained" and len(manifest["model_weights_sha256"]) == 64
    moved = tmp_path / "elsewhere"
    shutil.copytree(site, moved)
    shutil.rmtree(site)  # the original place is gone: only the copy's relative path can work
    gallery = Gallery(moved / "index" / "g")
    ids = gallery.add(images=paths[3:4], identities=[7])
    query, _ = embed_images(moved / "models" / "trained", paths[3:4])
    assert gallery.search_identities(query, 1)[0][0, 0] == 7 and gallery.search(query, 1)[1][0, 0] == ids[0]
    # same config.json claim, different weight bytes: refused by the weights' sha256
    weights = moved / "models" / "trained" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors does not hash to the index's model_weights_sha256"):
        gallery.add(images=paths[4:5], identities=[8])
    shutil.rmtree(moved / "models")
    with pytest.raises(FileNotFoundError, match=r"embedding model not found at .*recorded as '\.\./\.\./models/trained'"):
        gallery.add(images=paths[4:5], identities=[8])


def test_search_job_on_a_query_split_reports_rank1(tmp_path, tiny_model):
    from reidscale.data.shards import write_dataset
    from reidscale.embed import embed_split_in_process

    data = tmp_path / "data"
    write_dataset(generate(SyntheticConfig(num_identities=8, height=32, width=16, images_per_identity_median=5)),
                  data, source="synthetic", rows_per_group=16)
    vectors, meta = embed_split_in_process(tiny_model, data, "gallery")
    sha = json.loads((tiny_model / "config.json").read_text())["weights_sha256"]
    build_index(vectors, meta, tmp_path / "index", factory="Flat", model_sha256=sha,
                extra={"model_dir": str(tiny_model)}, log=lambda *_: None)
    summary = run_search(SearchJobConfig(index_dir=str(tmp_path / "index"), data_dir=str(data), split="query", k=3,
                                         format="json"))
    queries = pq.read_table(data / "query-00000.parquet", columns=["identity", "path"])
    assert summary["num_queries"] == len(queries) > 0
    assert [r["query_identity"] for r in summary["results"]] == queries.column("identity").to_pylist()
    assert 0.0 <= summary["rank1_accuracy"] <= 1.0


def test_build_job_takes_precomputed_vectors_from_npy(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16)).astype(np.float32) * 3  # not normalised: the job normalises
    np.save(tmp_path / "g.npy", x)
    pq.write_table(pa.table({"row_id": np.arange(300, dtype=np.int64) + 7, "identity": np.arange(300, dtype=np.int64) // 3,
                             "camera": np.zeros(300, np.int32), "path": [""] * 300}), tmp_path / "g.parquet")
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "build_index.py"), f"run_dir={tmp_path}",
                           f"embeddings={tmp_path / 'g.npy'}", "num_shards=3", "memory_budget_gb=0.5"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "index" / "g" / "build_summary.json").read_text())
    assert summary["factory"] == "Flat" and summary["num_shards"] == 3 and summary["ntotal"] == 300
    # calibrated and reported: exact search measures recall 1 (100 identities, filled up to all 300 rows)
    cal = summary["calibration"]
    assert cal["recall_at_k"] == 1.0 and cal["reached"] and cal["sample"] == 300 and cal["qps"] > 0
    assert (tmp_path / "index" / "g" / "calibration.png").stat().st_size > 0
    assert "recall@10 1.0000" in proc.stdout
    gallery = Gallery(tmp_path / "index" / "g")
    scores, ids = gallery.search(_unit(x[:5]), 1)
    assert ids[:, 0].tolist() == [7, 8, 9, 10, 11] and np.allclose(scores[:, 0], 1, atol=1e-5)
    assert gallery.identities(ids[:, 0]).tolist() == [0, 0, 0, 1, 1]


def test_embedding_pool_leaves_a_cpu_for_reading():
    from reidscale.embed import EmbedConfig, actor_cpus

    assert actor_cpus(EmbedConfig(num_actors=1, cpus_per_actor=1.0), 2, use_gpu=False) == 1.0
    assert actor_cpus(EmbedConfig(num_actors=2, cpus_per_actor=1.0), 2, use_gpu=False) == 0.5
    assert actor_cpus(EmbedConfig(num_actors=2, cpus_per_actor=1.0), 2, use_gpu=True) == 1.0


def test_finished_embeddings_are_reused_only_for_the_same_model_and_data(tmp_path):
    from reidscale.atomic import sha256_file
    from reidscale.atomic import write_json as atomic_write_json
    from reidscale.data.shards import write_dataset
    from reidscale.embed import EMBEDDINGS_MANIFEST, finished_embeddings, split_fingerprint

    data = tmp_path / "data"
    write_dataset(generate(SyntheticConfig(num_identities=6, height=32, width=16, images_per_identity_median=4)),
                  data, source="synthetic")
    emb = tmp_path / "emb"
    emb.mkdir()
    (emb / "embeddings-00000.parquet").write_bytes(b"vectors")
    stats = {"model_sha256": "m1", "data_sha256": split_fingerprint(data, "gallery"), "files": ["embeddings-00000.parquet"],
             "file_sha256": {"embeddings-00000.parquet": sha256_file(emb / "embeddings-00000.parquet")}}
    atomic_write_json(emb / EMBEDDINGS_MANIFEST, stats)
    assert finished_embeddings(emb, "m1", data, "gallery")["files"] == ["embeddings-00000.parquet"]
    assert finished_embeddings(emb, "m2", data, "gallery") is None  # another model
    assert finished_embeddings(emb, "m1", data, "query") is None  # another split's data
    (emb / "embeddings-00000.parquet").write_bytes(b"vectorz")
    assert finished_embeddings(emb, "m1", data, "gallery") is None  # a damaged shard is embedded again


def test_in_process_embedding_gives_an_sie_model_each_images_camera(tmp_path, images):
    """A model trained with camera SIE must get the camera at embedding time too, as in training."""
    from dataclasses import replace

    import torch

    from reidscale.embed import embed_images
    from reidscale.models.reid import build_reid_model, export_embedding_model

    paths, _ = images
    sie = replace(TINY, sie_cameras=4)
    torch.manual_seed(0)
    model = build_reid_model(sie, SIZE, num_classes=4)
    with torch.no_grad():  # SIE rows start near zero (std 0.02); make the cameras clearly different
        model.embedding.backbone.sie_embed.normal_()
    export = export_embedding_model(model.embedding, sie, SIZE, tmp_path / "sie")
    cam0, ok0 = embed_images(export, paths[:2], cameras=[0, 0])
    cam3, ok3 = embed_images(export, paths[:2], cameras=[3, 3])
    assert ok0.all() and ok3.all()
    assert np.abs(cam0 - cam3).max() > 1e-3
    again, _ = embed_images(export, paths[:2], cameras=[0, 0])
    np.testing.assert_allclose(again, cam0, atol=1e-6)
    with pytest.raises(ValueError, match="sie_cameras"):
        embed_images(export, paths[:2])
    with pytest.raises(ValueError, match="sie_cameras"):
        embed_images(export, paths[:2], cameras=[0, 4])
