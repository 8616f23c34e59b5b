"""Index build, search, add/remove and durability (library level, no Ray)."""

import json
import threading

import numpy as np
import pyarrow as pa
import pytest

from reidscale.index import build as build_mod
from reidscale.index.build import build_index, choose_factory, default_search_params
from reidscale.index.gallery import Gallery, GalleryError, merge_topk


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _gallery(n=500, d=16, seed=0):
    rng = np.random.default_rng(seed)
    x = _unit(rng.standard_normal((n, d)))
    ids = rng.permutation(np.arange(1000, 1000 + n)).astype(np.int64)
    meta = pa.table({"row_id": ids, "identity": ids // 5, "camera": (ids % 6).astype(np.int32),
                     "path": [f"p{i}" for i in ids]})
    return x, meta


def _clustered(n=20_000, d=32, ids_per=5, seed=0):
    """Identity centres (anisotropic, like real embeddings) + per-image noise; queries are other images."""
    rng = np.random.default_rng(seed)
    n_ids = n // ids_per
    centres = _unit(rng.standard_normal((n_ids, d)) * np.arange(1, d + 1) ** -0.75)
    identity = np.repeat(np.arange(n_ids), ids_per)
    x = _unit(centres[identity] + 0.6 / np.sqrt(d) * rng.standard_normal((n, d)))
    q_ident = rng.choice(n_ids, 200, replace=False)
    q = _unit(centres[q_ident] + 0.6 / np.sqrt(d) * rng.standard_normal((200, d)))
    meta = pa.table({"row_id": np.arange(n, dtype=np.int64), "identity": identity.astype(np.int64),
                     "camera": np.zeros(n, np.int32), "path": [""] * n})
    return x, meta, q


def _exact_topk(q, x, k):
    sims = q @ x.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), order


def _recall(found, truth):
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)])


def test_sharded_flat_search_equals_exact_search(tmp_path):
    x, meta = _gallery()
    build_index(x, meta, tmp_path, factory="Flat", num_shards=4, model_sha256="m")
    gallery = Gallery(tmp_path)
    assert gallery.ntotal == len(x) and len(gallery.shards) == 4
    q = np.random.default_rng(1).standard_normal((20, 16)).astype(np.float32)
    scores, ids = gallery.search(q, 10)
    exact, order = _exact_topk(q, x, 10)
    np.testing.assert_array_equal(ids, meta.column("row_id").to_numpy()[order])
    np.testing.assert_allclose(scores, exact, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(gallery.identities(ids), ids // 5)
    assert gallery.paths(ids[:1, :2]).tolist() == [[f"p{ids[0, 0]}", f"p{ids[0, 1]}"]]


def test_l2_metric_returns_smallest_squared_distances(tmp_path):
    x, meta = _gallery(n=300)
    build_index(x, meta, tmp_path, factory="Flat", metric="l2", num_shards=3)
    q = np.random.default_rng(2).standard_normal((5, 16)).astype(np.float32)
    scores, ids = Gallery(tmp_path).search(q, 4)
    d2 = ((q[:, None, :] - x[None]) ** 2).sum(-1)
    order = np.argsort(d2, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(ids, meta.column("row_id").to_numpy()[order])
    np.testing.assert_allclose(scores, np.take_along_axis(d2, order, 1), rtol=1e-4, atol=1e-4)


def test_merge_topk_ignores_missing_hits():
    scores = [np.array([[0.9, -3.4e38]]), np.array([[0.95, 0.1]])]
    ids = [np.array([[1, -1]]), np.array([[2, 3]])]
    s, i = merge_topk(scores, ids, 4, larger_is_better=True)
    assert i.tolist() == [[2, 1, 3, -1]]
    assert s[0, 3] == -np.inf


@pytest.mark.parametrize("factory,params,min_recall", [
    ("IVF64,Flat", {"nprobe": 8}, 0.95),
    ("IVF64,PQ16x4fs,RFlat", {"nprobe": 8, "k_factor_rf": 32}, 0.95),
    ("HNSW16", {"efSearch": 64}, 0.95),
])
def test_approximate_index_recall_against_brute_force(tmp_path, factory, params, min_recall):
    x, meta, q = _clustered()
    build_index(x, meta, tmp_path, factory=factory, num_shards=2, search_params=params)
    gallery = Gallery(tmp_path)
    _, ids = gallery.search(q, 10)
    _, truth = _exact_topk(q, x, 10)
    recall = _recall(ids, truth)
    assert recall >= min_recall, f"{factory}: recall@10 {recall:.3f} against exact search"
    # the stored search-time setting matters: one cell, no re-ranking loses neighbours
    weak = Gallery(tmp_path, search_params={k: 1 for k in params})
    assert _recall(weak.search(q, 10)[1], truth) < recall


def test_add_vectors_are_found_with_their_identities(tmp_path):
    x, meta = _gallery(n=200)
    build_index(x, meta, tmp_path, factory="Flat", num_shards=2)
    gallery = Gallery(tmp_path)
    new = _unit(np.random.default_rng(5).standard_normal((3, 16)))
    ids = gallery.add(new, identities=[77777, 77777, 88888], cameras=[1, 2, 3], paths=["a", "b", "c"])
    assert ids.tolist() == [1200, 1201, 1202]  # after the largest row id
    assert gallery.ntotal == 203 and gallery.generation == 1
    scores, hits = gallery.search(new, 1)
    assert hits[:, 0].tolist() == ids.tolist()
    assert gallery.identities(hits[:, 0]).tolist() == [77777, 77777, 88888]
    assert gallery.cameras(hits[:, 0]).tolist() == [1, 2, 3]
    # whole gallery still exact after the add
    all_x = np.concatenate([x, new])
    all_ids = np.concatenate([meta.column("row_id").to_numpy(), ids])
    q = np.random.default_rng(6).standard_normal((10, 16)).astype(np.float32)
    _, order = _exact_topk(q, all_x, 5)
    np.testing.assert_array_equal(gallery.search(q, 5)[1], all_ids[order])


def test_removed_rows_are_never_returned_and_the_rest_stays_exact(tmp_path):
    x, meta = _gallery(n=300)
    build_index(x, meta, tmp_path, factory="Flat", num_shards=3)
    gallery = Gallery(tmp_path)
    row_ids = meta.column("row_id").to_numpy()
    q = np.random.default_rng(3).standard_normal((15, 16)).astype(np.float32)
    # remove every query's current top 7 and more: forces the deeper re-search
    _, before = gallery.search(q, 7)
    gone = np.unique(before)
    assert gallery.remove(np.concatenate([gone, [999_999]])) == len(gone)  # unknown id ignored
    assert gallery.remove(gone[:3]) == 0  # already removed
    assert gallery.ntotal == 300 - len(gone)
    keep = ~np.isin(row_ids, gone)
    scores, ids = gallery.search(q, 10)
    _, order = _exact_topk(q, x[keep], 10)
    np.testing.assert_array_equal(ids, row_ids[keep][order])
    assert not np.isin(ids, gone).any()


def test_add_and_remove_persist_across_reopen(tmp_path):
    x, meta = _gallery(n=100)
    build_index(x, meta, tmp_path, factory="IVF4,Flat", search_params={"nprobe": 4})
    gallery = Gallery(tmp_path)
    new = _unit(np.random.default_rng(9).standard_normal((2, 16)))
    added = gallery.add(new, identities=[5, 6])
    gallery.remove([1000, added[1]])
    reopened = Gallery(tmp_path)
    assert reopened.generation == 2 and reopened.ntotal == 100 + 2 - 2
    _, hits = reopened.search(new, 1)
    assert hits[0, 0] == added[0] and hits[1, 0] != added[1]
    assert 1000 not in reopened.search(x[:20], 20)[1]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [e["file"] for e in manifest["removed"]] == ["removed-000002.npy"]
    assert manifest["shards"][-1]["file"] == "added-000001.faiss"


def test_open_reader_keeps_its_generation_until_refresh(tmp_path):
    x, meta = _gallery(n=100)
    build_index(x, meta, tmp_path, factory="Flat")
    reader, writer = Gallery(tmp_path), Gallery(tmp_path)
    new = _unit(np.random.default_rng(4).standard_normal((1, 16)))
    added = writer.add(new, identities=[1])
    writer.remove([1000])
    # the reader's view is the generation it opened, whole: no half-applied change
    assert reader.generation == 0 and reader.ntotal == 100
    assert reader.search(new, 1)[1][0, 0] != added[0]
    assert reader.refresh() and reader.generation == 2
    assert reader.search(new, 1)[1][0, 0] == added[0] and reader.ntotal == 100


def test_concurrent_writers_do_not_lose_each_others_changes(tmp_path):
    x, meta = _gallery(n=50)
    build_index(x, meta, tmp_path, factory="Flat")
    writers = [Gallery(tmp_path) for _ in range(4)]
    vectors = _unit(np.random.default_rng(8).standard_normal((4, 16)))
    threads = [threading.Thread(target=w.add, args=(vectors[i : i + 1], [i])) for i, w in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = Gallery(tmp_path)
    assert final.generation == 4 and final.ntotal == 54
    _, hits = final.search(vectors, 1)
    assert sorted(final.identities(hits[:, 0]).tolist()) == [0, 1, 2, 3]


def test_tampered_or_unfinished_index_is_refused(tmp_path):
    x, meta = _gallery(n=50)
    manifest = build_index(x, meta, tmp_path, factory="Flat", num_shards=2)
    shard = tmp_path / manifest["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(GalleryError, match=shard.name):
        Gallery(tmp_path)
    shard.write_bytes(bytes(data[:100]))  # truncated copy
    with pytest.raises(GalleryError, match="sha256"):
        Gallery(tmp_path)
    shard.unlink()
    with pytest.raises(GalleryError, match="missing"):
        Gallery(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(GalleryError, match="never completed"):
        Gallery(tmp_path)


def test_tampered_added_shard_or_tombstones_are_refused(tmp_path):
    x, meta = _gallery(n=50)
    build_index(x, meta, tmp_path, factory="Flat")
    gallery = Gallery(tmp_path)
    gallery.add(x[:2], identities=[1, 2])
    gallery.remove([1001])
    for name in ("added-000001.parquet", "removed-000002.npy"):
        path = tmp_path / name
        original = path.read_bytes()
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(GalleryError, match=name):
            Gallery(tmp_path)
        path.write_bytes(original)
    assert Gallery(tmp_path).ntotal == 51


def test_interrupted_build_resumes_and_keeps_finished_shards(tmp_path, monkeypatch):
    x, meta = _gallery(n=400)
    real_fill, calls = build_mod.fill_shard, []

    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("power cut")
        return real_fill(*args, **kwargs)

    monkeypatch.setattr(build_mod, "fill_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        build_index(x, meta, tmp_path, factory="IVF8,Flat", num_shards=4, model_sha256="m")
    with pytest.raises(GalleryError, match="never completed"):
        Gallery(tmp_path)
    first = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.faiss")}
    assert sorted(first) == ["shard-00000.faiss", "shard-00001.faiss", "trained.faiss"]
    monkeypatch.setattr(build_mod, "fill_shard", real_fill)
    build_index(x, meta, tmp_path, factory="IVF8,Flat", num_shards=4, model_sha256="m")
    second = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.faiss")}
    for name in first:  # finished shards and the trained quantizer are kept, not rebuilt
        assert second[name] == first[name], name
    assert len(second) == 5 and not (tmp_path / "manifest.partial.json").exists()
    gallery = Gallery(tmp_path, search_params={"nprobe": 8})
    assert gallery.ntotal == 400
    _, ids = gallery.search(x[:10], 1)  # exhaustive nprobe: every vector finds itself
    np.testing.assert_array_equal(ids[:, 0], meta.column("row_id").to_numpy()[:10])


def test_resume_rebuilds_a_shard_whose_inputs_changed(tmp_path, monkeypatch):
    x, meta = _gallery(n=200)
    real_fill = build_mod.fill_shard
    calls = []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_fill(*args, **kwargs)

    monkeypatch.setattr(build_mod, "fill_shard", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        build_index(x, meta, tmp_path, factory="Flat", num_shards=2)
    monkeypatch.setattr(build_mod, "fill_shard", real_fill)
    x2 = x.copy()
    x2[0] = -x2[0]  # the finished shard's input changed: it must not be reused
    build_index(x2, meta, tmp_path, factory="Flat", num_shards=2)
    _, ids = Gallery(tmp_path).search(x2[:1], 1)
    assert ids[0, 0] == meta.column("row_id").to_numpy()[0]


def test_rebuilding_a_complete_index_keeps_it_and_its_additions(tmp_path):
    x, meta = _gallery(n=100)
    build_index(x, meta, tmp_path, factory="Flat")
    Gallery(tmp_path).add(x[:1], identities=[3])
    before = (tmp_path / "shard-00000.faiss").stat().st_mtime_ns
    manifest = build_index(x, meta, tmp_path, factory="Flat", log=lambda *_: None)
    assert manifest["generation"] == 1 and Gallery(tmp_path).ntotal == 101
    assert (tmp_path / "shard-00000.faiss").stat().st_mtime_ns == before


def test_factory_choice_follows_size_and_memory_budget():
    gib = 1 << 30
    assert choose_factory(10_000, 512) == "Flat"
    big = choose_factory(1_000_000, 512, 8 * gib)
    assert big == "IVF1024,PQ256x4fs,RFlat"  # raw vectors fit: exact re-ranking
    assert choose_factory(1_000_000, 512, gib).endswith("Refine(SQ8)")  # only 8-bit copies fit
    tight = choose_factory(10_000_000, 512, gib)
    assert "Refine" not in tight and "RFlat" not in tight and tight.startswith("IVF4096,PQ")
    assert choose_factory(10_000, 512, 1 << 20).startswith("IVF")  # even a small gallery obeys the budget
    with pytest.raises(ValueError, match="too small"):
        choose_factory(10_000_000, 512, 1 << 20)
    assert default_search_params(big, 1_000_000) == {"nprobe": 16, "k_factor_rf": 16}
    assert default_search_params("HNSW32", 10) == {"efSearch": 128}


def test_auto_factory_is_recorded_with_its_search_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(build_mod, "FLAT_MAX_ROWS", 1000)
    x, meta, _ = _clustered(n=3000)
    manifest = build_index(x, meta, tmp_path)
    assert manifest["factory"] == "IVF64,PQ16x4fs,RFlat" and manifest["factory_requested"] == "auto"
    # the stored settings are the calibrated ones, and the reader applies them
    assert manifest["search"] == manifest["calibration"]["chosen"] and set(manifest["search"]) == {"nprobe", "k_factor_rf"}
    import faiss

    ivf = faiss.extract_index_ivf(Gallery(tmp_path).shards[0])
    assert ivf.nprobe == manifest["search"]["nprobe"]
    # given settings are kept as given, not calibrated
    manifest = build_index(x, meta, tmp_path / "given", search_params={"nprobe": 16, "k_factor_rf": 16})
    assert manifest["search"] == {"nprobe": 16, "k_factor_rf": 16} and "calibration" not in manifest


def test_duplicate_or_negative_row_ids_are_refused(tmp_path):
    x, meta = _gallery(n=10)
    bad = meta.set_column(0, "row_id", pa.array(np.zeros(10, dtype=np.int64)))
    with pytest.raises(ValueError, match="not unique"):
        build_index(x, bad, tmp_path)
    bad = meta.set_column(0, "row_id", pa.array(np.arange(-1, 9, dtype=np.int64)))
    with pytest.raises(ValueError, match=">= 0"):
        build_index(x, bad, tmp_path)
