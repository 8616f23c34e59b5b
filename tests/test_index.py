import json

import numpy as np
import pyarrow as pa
import pytest

from reidscale.index.build import build_index, choose_factory
from reidscale.index.gallery import Gallery, GalleryError, merge_topk


def _gallery(n=500, d=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = rng.permutation(np.arange(1000, 1000 + n)).astype(np.int64)
    meta = pa.table({"row_id": ids, "identity": ids // 5, "camera": (ids % 6).astype(np.int32),
                     "path": [f"p{i}" for i in ids]})
    return x, meta


def test_sharded_search_equals_exact_search(tmp_path):
    x, meta = _gallery()
    build_index(x, meta, tmp_path, factory="Flat", num_shards=4, model_sha256="m")
    gallery = Gallery(tmp_path)
    assert gallery.ntotal == len(x) and len(gallery.shards) == 4
    q = np.random.default_rng(1).standard_normal((20, 16)).astype(np.float32)
    scores, ids = gallery.search(q, 10)
    exact = q @ x.T
    order = np.argsort(-exact, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(ids, meta.column("row_id").to_numpy()[order])
    np.testing.assert_allclose(scores, np.take_along_axis(exact, order, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(gallery.identities(ids), ids // 5)


def test_merge_topk_ignores_missing_hits():
    scores = [np.array([[0.9, -3.4e38]]), np.array([[0.95, 0.1]])]
    ids = [np.array([[1, -1]]), np.array([[2, 3]])]
    s, i = merge_topk(scores, ids, 3, larger_is_better=True)
    assert i.tolist() == [[2, 1, 3]]


def test_tampered_or_unfinished_index_is_refused(tmp_path):
    x, meta = _gallery(n=50)
    manifest = build_index(x, meta, tmp_path, factory="Flat", num_shards=2)
    shard = tmp_path / manifest["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(GalleryError, match=shard.name):
        Gallery(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(GalleryError, match="never completed"):
        Gallery(tmp_path)


def test_interrupted_build_resumes_and_keeps_finished_shards(tmp_path):
    x, meta = _gallery(n=200)
    build_index(x, meta, tmp_path, factory="Flat", num_shards=4, model_sha256="m")
    first = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard-*.faiss")}
    # simulate a crash after two shards: partial manifest lists them, no final manifest
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "shard-00003.faiss").unlink()
    partial = {"model_sha256": "m", "factory": "Flat", "n": 200, "shards": manifest["shards"][:2]}
    (tmp_path / "manifest.partial.json").write_text(json.dumps(partial))
    build_index(x, meta, tmp_path, factory="Flat", num_shards=4, model_sha256="m")
    second = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard-*.faiss")}
    assert second["shard-00000.faiss"] == first["shard-00000.faiss"]
    assert second["shard-00001.faiss"] == first["shard-00001.faiss"]
    assert second["shard-00002.faiss"] != first["shard-00002.faiss"]
    assert not (tmp_path / "manifest.partial.json").exists()
    assert Gallery(tmp_path).ntotal == 200


def test_factory_choice_grows_with_size():
    assert choose_factory(10_000, 512) == "Flat"
    assert choose_factory(1_000_000, 512).startswith("IVF") and choose_factory(1_000_000, 512).endswith(",Flat")
    assert "PQ" in choose_factory(10_000_000, 512)


def test_duplicate_row_ids_are_refused(tmp_path):
    x, meta = _gallery(n=10)
    bad = meta.set_column(0, "row_id", pa.array(np.zeros(10, dtype=np.int64)))
    with pytest.raises(ValueError, match="not unique"):
        build_index(x, bad, tmp_path)
