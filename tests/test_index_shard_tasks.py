"""Shards filled from row sources (files read a range at a time) equal shards filled from arrays."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reidscale.embed import embedding_schema
from reidscale.index.build import build_index
from reidscale.index.job import load_precomputed, open_precomputed_rows
from reidscale.index.rows import NpyRows, ParquetRows, RowRange


def _write_embeddings(directory, x, files=3):
    directory.mkdir()
    n, d = x.shape
    bounds = np.linspace(0, n, files + 1).astype(int)
    for f, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        table = pa.table({"row_id": np.arange(lo, hi, dtype=np.int64), "identity": np.arange(lo, hi) // 4,
                          "camera": np.zeros(hi - lo, np.int32), "path": [f"img{i}.jpg" for i in range(lo, hi)],
                          "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x[lo:hi].reshape(-1)), d)},
                         schema=embedding_schema(d))
        pq.write_table(table, directory / f"embeddings-{f:05d}.parquet")


def test_row_sources_read_the_rows_of_the_arrays_they_stand_for(tmp_path):
    x = np.random.default_rng(0).standard_normal((1000, 12)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    _write_embeddings(tmp_path / "emb", x)
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    pos = np.array([0, 5, 332, 333, 334, 999])
    for normalize, want in ((False, x), (True, unit)):
        for rows in (NpyRows.open(tmp_path / "x.npy", normalize), ParquetRows.open(tmp_path / "emb", None, normalize)):
            assert rows.shape == (1000, 12) and len(rows) == 1000
            for lo, hi in ((0, 1000), (330, 700), (999, 1000), (10, 10)):
                np.testing.assert_array_equal(rows[lo:hi], want[lo:hi])
            np.testing.assert_array_equal(rows[pos], want[pos])
            np.testing.assert_array_equal(RowRange(rows, 300, 400)[10:20], want[310:320])
    with pytest.raises(IndexError):
        NpyRows.open(tmp_path / "x.npy")[np.array([1000])]


@pytest.mark.parametrize("factory", ["Flat", "IVF16,PQ4x4fs,RFlat"])
def test_build_from_files_read_per_shard_writes_the_bytes_of_the_in_memory_build(tmp_path, factory):
    x = np.random.default_rng(1).standard_normal((3000, 8)).astype(np.float32) * 3  # not unit length
    _write_embeddings(tmp_path / "emb", x, files=4)
    vectors, meta, _ = load_precomputed(tmp_path / "emb")
    rows, rows_meta, _ = open_precomputed_rows(tmp_path / "emb")
    assert isinstance(rows, ParquetRows) and rows.normalize and rows_meta.equals(meta)
    quiet = dict(factory=factory, num_shards=3, calibration=None, log=lambda *_: None)
    a = build_index(vectors, meta, tmp_path / "a", **quiet)
    b = build_index(rows, rows_meta, tmp_path / "b", **quiet)
    assert a["build_key"] == b["build_key"]
    assert [e["sha256"] for e in a["shards"]] == [e["sha256"] for e in b["shards"]]
    for e in a["shards"]:
        assert (tmp_path / "a" / e["file"]).read_bytes() == (tmp_path / "b" / e["file"]).read_bytes()


def test_a_bad_row_read_from_files_is_named_by_its_gallery_row(tmp_path):
    x = np.random.default_rng(2).standard_normal((900, 8)).astype(np.float32)
    x[700, 3] = np.nan
    np.save(tmp_path / "g.npy", x)
    rows, meta, _ = open_precomputed_rows(tmp_path / "g.npy", normalize=False)
    with pytest.raises(ValueError, match=r"g\.npy: row 700 \(1 row\) not finite"):
        build_index(rows, meta, tmp_path / "i", num_shards=3, factory="Flat", calibration=None,
                    source=str(tmp_path / "g.npy"), log=lambda *_: None)


def test_shards_dealt_by_size_balance_the_vectors_each_holder_gets():
    from reidscale.index.distributed import assign_by_size

    assert assign_by_size([100, 100, 100, 100], 2) == [[0, 2], [1, 3]]
    bins = assign_by_size([500, 100, 300, 200, 250], 2)
    assert sorted(p for b in bins for p in b) == [0, 1, 2, 3, 4]
    assert sorted(sum([500, 100, 300, 200, 250][p] for p in b) for b in bins) == [650, 700]
    assert assign_by_size([5], 3) == [[0], [], []]


def test_shard_servers_together_answer_as_the_gallery_with_its_tombstones(tmp_path):
    """Without Ray: the actor's class, holding some shards each, merged as the client merges."""
    from reidscale.index.distributed import ShardServer, assign_by_size
    from reidscale.index.gallery import Gallery
    from reidscale.index.hits import search_live

    rng = np.random.default_rng(3)
    x = rng.standard_normal((2000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    meta = pa.table({"row_id": np.arange(2000, dtype=np.int64), "identity": np.arange(2000) // 4,
                     "camera": np.zeros(2000, np.int32), "path": [""] * 2000})
    build_index(x, meta, tmp_path, factory="Flat", num_shards=5, calibration=None, log=lambda *_: None)
    gallery = Gallery(tmp_path)
    q = x[:20] + 0.05
    gone = np.unique(gallery.search(q, 3)[1])
    assert gallery.remove(gone) == len(gone)
    m = gallery.manifest
    servers = [ShardServer(str(tmp_path), [(p, m["shards"][p]) for p in b], m["removed"], m.get("search", {}), "ip")
               for b in assign_by_size([e["ntotal"] for e in m["shards"]], 2)]

    def scatter(queries, fetch):
        hits = [None] * len(m["shards"])
        for server in servers:
            for pos, s, i, more in server.search(queries, fetch, 0):
                hits[pos] = (s, i, more)
        return hits

    scores, ids = search_live(scatter, len(gone), q, 10, True)
    want = gallery.search(q, 10)
    np.testing.assert_array_equal(ids, want[1])
    np.testing.assert_array_equal(scores, want[0])
    live = np.setdiff1d(np.arange(2000), gone)  # exact reference: numpy over the live rows
    exact = live[np.argsort(-(q @ x[live].T), axis=1, kind="stable")[:, :10]]
    np.testing.assert_array_equal(ids, exact)
    assert servers[0].search(q, 10, version=1) is None  # a caller expecting another state is told so
