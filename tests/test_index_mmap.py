"""Shards served memory-mapped from disk (``mmap=True``): the same answers, not the same memory."""

import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest

from reidscale.index.build import build_index
from reidscale.index.distributed import ShardServer
from reidscale.index.gallery import Gallery


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _data(n=6000, d=32, seed=0):
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((n // 4, d)))
    identity = np.repeat(np.arange(n // 4), 4)
    x = _unit(centres[identity] + 0.3 * rng.standard_normal((n, d)) / np.sqrt(d))
    meta = pa.table({"row_id": np.arange(n, dtype=np.int64) * 3, "identity": identity.astype(np.int64),
                     "camera": (np.arange(n) % 5).astype(np.int32), "path": [f"p{i}" for i in range(n)]})
    q = _unit(centres[rng.choice(n // 4, 100, replace=False)] + 0.3 * rng.standard_normal((100, d)) / np.sqrt(d))
    return x, meta, q


# every kind of shard the automatic choice or a user's factory string gives
FACTORIES = ["Flat", "IVF64,Flat", "IVF64,PQ16x4fs,RFlat", "IVF64,PQ8x4fs,Refine(SQ8)", "IVF64,PQ8", "IVF64,SQ8",
             "HNSW16"]


@pytest.mark.parametrize("factory", FACTORIES)
def test_mapped_gallery_answers_exactly_as_the_loaded_one(tmp_path, factory):
    x, meta, q = _data()
    params = {"nprobe": 8} if factory.startswith("IVF") else None
    build_index(x, meta, tmp_path, factory=factory, num_shards=2, search_params=params, calibration=None)
    loaded, mapped = Gallery(tmp_path), Gallery(tmp_path, mmap=True)
    want, got = loaded.search(q, 10), mapped.search(q, 10)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    assert np.isin(got[1], meta.column("row_id").to_numpy()).all()


def test_mapped_gallery_adds_removes_and_reopens(tmp_path):
    x, meta, q = _data()
    build_index(x[:5000], meta.slice(0, 5000), tmp_path, factory="IVF32,Flat", num_shards=2,
                search_params={"nprobe": 32}, calibration=None)
    mapped = Gallery(tmp_path, mmap=True)
    gone = np.unique(mapped.search(q, 3)[1][:, 0])
    assert mapped.remove(gone) == len(gone)
    new = mapped.add(x[5000:], np.full(1000, 7), paths=[f"n{i}" for i in range(1000)])
    again = Gallery(tmp_path, mmap=True)
    reference = Gallery(tmp_path)
    for g in (mapped, again):
        scores, ids = g.search(x[5000:5010], 1)
        np.testing.assert_array_equal(ids[:, 0], new[:10])  # every added row is its own nearest neighbour
        np.testing.assert_array_equal(g.search(q, 10)[1], reference.search(q, 10)[1])
        assert not np.isin(g.search(q, 10)[1], gone).any()


def test_shard_server_maps_its_shards_and_answers_as_when_loaded(tmp_path):
    x, meta, q = _data()
    manifest = build_index(x, meta, tmp_path, factory="IVF64,PQ16x4fs,RFlat", num_shards=3,
                           search_params={"nprobe": 16, "k_factor_rf": 8}, calibration=None)
    shards = list(enumerate(manifest["shards"]))
    args = (str(tmp_path), shards, [], manifest["search"], manifest["metric"])
    want, got = ShardServer(*args).search(q, 10, 0), ShardServer(*args, mmap=True).search(q, 10, 0)
    assert [w[0] for w in want] == [g[0] for g in got] == [0, 1, 2]
    for w, g in zip(want, got):
        for a, b in zip(w[1:], g[1:]):
            np.testing.assert_array_equal(a, b)


# Measured in a fresh process: the shard's bytes must not land in the process's own (anonymous)
# memory when mapped, and must when loaded; the page cache holding them is the kernel's. At the
# shard level: the metadata table Gallery also loads is the same either way.
_MEMORY_PROBE = textwrap.dedent("""
    import sys
    from pathlib import Path
    import faiss
    import numpy as np
    from reidscale.index import manifest as store
    from reidscale.index.generation import load_shard

    def anon_mib():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
        raise SystemExit("no RssAnon")

    entry = store.read_manifest(sys.argv[1])["shards"][0]
    q = np.random.default_rng(1).standard_normal((200, 128)).astype(np.float32)
    before = anon_mib()
    index = load_shard(Path(sys.argv[1]), entry, True, sys.argv[2] == "1")
    faiss.extract_index_ivf(index).nprobe = 16  # every list: the whole shard is read
    index.search(q, 10)
    print(anon_mib() - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RssAnon from /proc/self/status")
def test_mapped_shards_stay_out_of_the_process_memory(tmp_path):
    n, d = 400_000, 128  # 195 MiB of float32 in one IVF-Flat shard
    rng = np.random.default_rng(0)
    x = _unit(rng.standard_normal((n, d)))
    meta = pa.table({"row_id": np.arange(n, dtype=np.int64), "identity": np.arange(n, dtype=np.int64) // 4,
                     "camera": np.zeros(n, np.int32), "path": [""] * n})
    build_index(x, meta, tmp_path, factory="IVF16,Flat", num_shards=1, search_params={"nprobe": 16},
                calibration=None)
    shard_mib = n * d * 4 / 2**20

    def grown(mmap):
        out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(tmp_path), "1" if mmap else "0"],
                             capture_output=True, text=True, check=True)
        return float(out.stdout.split()[-1])

    loaded, mapped = grown(False), grown(True)
    assert loaded > 0.8 * shard_mib, (loaded, shard_mib)
    # what stays in memory when mapped: IndexIDMap2's id → position map (~50 B per row)
    assert mapped < 0.25 * shard_mib, (mapped, shard_mib)
