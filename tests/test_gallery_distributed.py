"""A gallery built by Ray tasks and searched by shard actors on a real two-node Ray cluster.

Both nodes run on this machine, on loopback: a head (``ray start --head``) and a second node
(``ray start --address=...``) with its own custom resource, tagged the way
``clusters/local/start.sh`` tags its head so ``clusters/local/stop.sh --tag`` stops exactly what
this test started (never ``ray stop``). The references are independent of the Ray path: the
same index built in this process without Ray, ``Gallery`` on it, and exact numpy search.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "clusters" / "local"))
from two_nodes import two_node_cluster  # noqa: E402  (the cluster machinery, shared with bench/)
FACTORY = "IVF32,PQ8x4fs,RFlat"
SHARDS = 6


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped  # a dual-stack socket bound to ::ffff:127.0.0.1
    return addr.is_loopback


def _tagged(tag: str) -> set[int]:
    out = subprocess.run(["bash", str(REPO / "clusters/local/stop.sh"), "--list", tag], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


@pytest.fixture(scope="module")
def cluster():
    """A two-node loopback cluster this process is connected to: {"tag", "tmp", "address", "nodes"}
    (clusters/local/two_nodes.py, which the distributed gallery benchmark starts too)."""
    with two_node_cluster(resources=({"gallery_node_a": 1}, {"gallery_node_b": 1}), prefix="rs-dg-") as c:
        yield c


@pytest.fixture(scope="module")
def built(cluster):
    """The same gallery built twice: in this process without Ray, and by Ray tasks from the .npy on disk."""
    from reidscale.index.build import build_index
    from reidscale.index.job import open_precomputed_rows

    rng = np.random.default_rng(0)
    n, d, per = 12_000, 32, 6
    centres = _unit(rng.standard_normal((n // per, d)) * np.arange(1, d + 1) ** -0.5)
    identity = np.repeat(np.arange(n // per), per)
    x = _unit(centres[identity] + 0.5 / np.sqrt(d) * rng.standard_normal((n, d)))
    q = _unit(centres[rng.choice(n // per, 64, replace=False)] + 0.5 / np.sqrt(d) * rng.standard_normal((64, d)))
    tmp = cluster["tmp"]
    np.save(tmp / "gallery.npy", x)
    meta = pa.table({"row_id": np.arange(n, dtype=np.int64), "identity": identity.astype(np.int64),
                     "camera": (np.arange(n) % 4).astype(np.int32), "path": [f"img{i}.jpg" for i in range(n)]})
    import pyarrow.parquet as pq

    pq.write_table(meta, tmp / "gallery.parquet")
    quiet = dict(factory=FACTORY, num_shards=SHARDS, train_size=2048, calibration=None,
                 search_params={"nprobe": 8, "k_factor_rf": 8}, log=lambda *_: None)
    local = build_index(x, meta, tmp / "local", **quiet)
    rows, rows_meta, _ = open_precomputed_rows(tmp / "gallery.npy")
    t0 = time.monotonic()
    tasks = build_index(rows, rows_meta, tmp / "tasks", shard_tasks=True, **quiet)
    return {"x": x, "q": q, "meta": meta, "local": local, "tasks": tasks, "tasks_s": time.monotonic() - t0}


def test_cluster_has_two_loopback_nodes_each_with_its_own_resource(cluster):
    nodes = cluster["nodes"]
    assert len(nodes) == 2, nodes
    assert sorted(r for res in nodes.values() for r in res if r.startswith("gallery_node_")) == \
        ["gallery_node_a", "gallery_node_b"]
    pids = _tagged(cluster["tag"])
    socks = [(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="tcp")
             if c.status == psutil.CONN_LISTEN and c.pid in pids]
    public = [(ip, port) for ip, port in socks if not _is_loopback(ip)]
    assert socks and not public, f"listening beyond loopback: {public}"


def test_shards_filled_by_tasks_on_both_nodes_are_the_bytes_of_the_single_process_build(cluster, built):
    local, tasks, tmp = built["local"], built["tasks"], cluster["tmp"]
    assert tasks["build_key"] == local["build_key"]
    assert [e["sha256"] for e in tasks["shards"]] == [e["sha256"] for e in local["shards"]]
    for e in local["shards"]:
        assert (tmp / "tasks" / e["file"]).read_bytes() == (tmp / "local" / e["file"]).read_bytes()
    filled_on = tasks["fill"]["nodes"]
    assert sorted(filled_on) == [e["file"] for e in local["shards"]]
    assert len(set(filled_on.values())) == 2, filled_on  # tasks ran on both nodes


def _reference_hits(directory, positions, queries, k, params):
    """Per-shard search in this process over the shards at ``positions``, merged (the partial answer)."""
    from reidscale.index import manifest as store
    from reidscale.index.generation import apply_search_params, load_shard
    from reidscale.index.hits import merge_topk

    manifest = store.read_manifest(directory)
    shards = [load_shard(Path(directory), manifest["shards"][p]) for p in positions]
    apply_search_params(shards, params)
    hits = [s.search(queries, k) for s in shards]
    return merge_topk([h[0] for h in hits], [h[1] for h in hits], k, True)


@pytest.mark.timeout(300)
def test_shard_actors_on_both_nodes_answer_as_the_single_process_gallery_and_survive_a_kill(cluster, built):
    import ray

    from reidscale.index.distributed import DistributedGallery, ShardsUnavailable
    from reidscale.index.gallery import Gallery

    tmp, q, x = cluster["tmp"], built["q"], built["x"]
    reference = Gallery(tmp / "local")
    dist = DistributedGallery(tmp / "tasks", actor_cpus=0.5, wait_s=60)
    try:
        assert len({p["node"] for p in dist.describe_actors()}) == 2, dist.describe_actors()
        held = sorted(s for p in dist.describe_actors() for s in p["shards"])
        assert held == sorted(e["file"] for e in built["local"]["shards"])
        # same ids and scores as the single-process gallery; Flat-exact ids for the top hit
        want = reference.search(q, 10)
        got = dist.search(q, 10)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
        for a, b in zip(dist.search_identities(q, 5), reference.search_identities(q, 5)):
            np.testing.assert_array_equal(a, b)
        rows = want[1][:, :3]
        np.testing.assert_array_equal(dist.identities(rows), reference.identities(rows))
        np.testing.assert_array_equal(dist.paths(rows), reference.paths(rows))
        exact = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, 0]
        assert np.mean(got[1][:, 0] == exact) >= 0.9

        # removes and adds by another writer: tombstones reach every actor, the new shard one actor
        writer = Gallery(tmp / "tasks")
        gone = np.unique(want[1][:, :2])
        writer.remove(gone)
        new_ids = writer.add(_unit(q[:50] + 0.01), np.full(50, 99_999), paths=[f"new{i}" for i in range(50)])
        assert dist.refresh()
        after = writer.search(q, 10)
        got = dist.search(q, 10)
        np.testing.assert_array_equal(got[1], after[1])
        np.testing.assert_array_equal(got[0], after[0])
        assert not np.isin(got[1], gone).any() and np.isin(new_ids, got[1]).any()
        assert dist.ntotal == writer.ntotal

        # and through the client itself: the removes reach every actor, the added shard the lightest one
        more_gone = np.unique(after[1][:, 0])
        assert dist.remove(more_gone) == len(more_gone)
        added = dist.add(_unit(q[50:] + 0.01), np.full(len(q) - 50, 88_888), paths=[f"c{i}" for i in range(len(q) - 50)])
        holders = [p["shards"] for p in dist.describe_actors()]
        newest = dist.manifest["shards"][-1]["file"]
        assert sum(newest in h for h in holders) == 1, holders
        writer.refresh()
        after = writer.search(q, 10)  # a Gallery opened on what the client published
        got = dist.search(q, 10)
        np.testing.assert_array_equal(got[1], after[1])
        np.testing.assert_array_equal(got[0], after[0])
        assert not np.isin(got[1], more_gone).any() and np.isin(added, got[1]).any()
        np.testing.assert_array_equal(dist.identities(added), np.full(len(added), 88_888))
        gone = np.concatenate([gone, more_gone])

        # an actor killed during queries is restarted by Ray and reloads its shards; queries wait for it
        victim = 1
        before = dist.describe_actors()[victim]
        results, took, errors, stop = [], [], [], threading.Event()

        def ask():
            while not stop.is_set():
                t = time.monotonic()
                try:
                    results.append(dist.search(q, 10))
                    took.append(time.monotonic() - t)
                except ShardsUnavailable as exc:
                    errors.append(str(exc))

        asker = threading.Thread(target=ask)
        asker.start()
        time.sleep(0.5)
        t_kill = time.monotonic()
        ray.kill(dist.actors[victim], no_restart=False)
        time.sleep(3)
        stop.set()
        asker.join(timeout=120)
        now = dist.describe_actors()[victim]
        assert now["pid"] != before["pid"] and now["shards"] == before["shards"], (before, now)
        assert not errors, errors[:2]
        # queries before, during and after: one of them waited for the restart (a new worker process
        # loading its shards takes far longer than a query)
        assert len(results) >= 3 and max(took) > 10 * np.median(took), (len(results), max(took), np.median(took))
        for s, i in results:
            np.testing.assert_array_equal(i, after[1])
            np.testing.assert_array_equal(s, after[0])
        assert time.monotonic() - t_kill < 60

        # killed by its pid: the same
        os.kill(now["pid"], signal.SIGKILL)
        got = dist.search(q, 10)
        np.testing.assert_array_equal(got[1], after[1])

        # an actor gone for good: a one-line error naming its shards, or a partial answer that says so
        dead = 0
        lost = dist.describe_actors()[dead]["shards"]
        ray.kill(dist.actors[dead], no_restart=True)
        with pytest.raises(ShardsUnavailable) as info:
            dist.search(q, 10)
        assert sorted(info.value.shards) == sorted(lost) and "\n" not in str(info.value)
        assert all(name in str(info.value) for name in lost)
        partial = dist.search(q, 10, allow_partial=True)
        assert partial.missing == sorted(lost)
        names = [e["file"] for e in writer.manifest["shards"]]
        kept = [p for p, name in enumerate(names) if name not in lost]
        # the first round's depth (k + min(removed, k)): no row runs short with most shards answering
        ref_s, ref_i = _reference_hits(tmp / "tasks", kept, q, 10 + min(len(gone), 10), {"nprobe": 8, "k_factor_rf": 8})
        live = ~np.isin(ref_i, gone)
        for r in range(len(q)):  # the reference's live hits, in order, are the partial answer
            np.testing.assert_array_equal(partial.ids[r], ref_i[r][live[r]][:10])

        # a restart reloads the shards checked against their sha256: a changed file is refused, by name
        other = before["shards"]  # actor 1 (actor 0 is gone)
        path = tmp / "tasks" / other[0]
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
        ray.kill(dist.actors[1], no_restart=False)
        deadline, message = time.monotonic() + 60, ""
        while f"{other[0]}: sha256 does not match" not in message and time.monotonic() < deadline:
            with pytest.raises(ShardsUnavailable) as info:  # actor 0 is gone: every search fails now
                dist.search(q, 10)
            message = str(info.value)  # until the kill lands, the old actor 1 still answers
        assert "\n" not in message and f"{other[0]}: sha256 does not match" in message, message
        assert all(name in info.value.shards for name in other)
    finally:
        dist.close()


def test_build_job_with_shard_tasks_reads_embedding_files_on_both_nodes_into_the_same_index(cluster):
    import pyarrow.parquet as pq

    from reidscale.embed import embedding_schema
    from reidscale.index.job import IndexJobConfig, build_gallery_index

    tmp = cluster["tmp"] / "job"
    emb = tmp / "emb"
    emb.mkdir(parents=True)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3000, 16)).astype(np.float32) * 2  # not unit length: the job normalises
    for f, lo in enumerate(range(0, 3000, 750)):
        pq.write_table(pa.table({"row_id": np.arange(lo, lo + 750, dtype=np.int64), "identity": np.arange(lo, lo + 750) // 3,
                                 "camera": np.zeros(750, np.int32), "path": [f"{i}.jpg" for i in range(lo, lo + 750)],
                                 "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x[lo:lo + 750].reshape(-1)), 16)},
                                schema=embedding_schema(16)), emb / f"embeddings-{f:05d}.parquet")
    runs = {}
    for tasks in (False, True):
        cfg = IndexJobConfig(run_dir=str(tmp), embeddings=str(emb), out_dir=str(tmp / f"index-{tasks}"),
                             factory="IVF16,Flat", num_shards=4, search_params="nprobe=4", shard_tasks=tasks)
        build_gallery_index(cfg)
        runs[tasks] = json.loads((tmp / f"index-{tasks}" / "manifest.json").read_text())
    assert [e["sha256"] for e in runs[True]["shards"]] == [e["sha256"] for e in runs[False]["shards"]]
    assert runs[True]["metadata"]["sha256"] == runs[False]["metadata"]["sha256"]
    assert len(set(runs[True]["fill"]["nodes"].values())) == 2, runs[True]["fill"]


def test_an_interrupted_task_build_keeps_its_finished_shards_and_fills_the_rest_on_the_cluster(cluster):
    from reidscale.index.build import build_index
    from reidscale.index.job import open_precomputed_rows

    tmp = cluster["tmp"] / "resume"
    tmp.mkdir()
    x = _unit(np.random.default_rng(7).standard_normal((4000, 16)))
    np.save(tmp / "g.npy", x)
    rows, meta, _ = open_precomputed_rows(tmp / "g.npy")
    quiet = dict(factory="IVF16,Flat", num_shards=4, calibration=None, search_params={"nprobe": 16},
                 shard_tasks=True, log=lambda *_: None)
    full = build_index(rows, meta, tmp / "index", **quiet)
    # what a build killed after its first two shards leaves: no manifest, a partial one naming them
    index = tmp / "index"
    (index / "manifest.json").unlink()
    for e in full["shards"][2:]:
        (index / e["file"]).unlink()
    partial = {"build_key": full["build_key"], "trained": full["trained"],
               "shards": {e["file"]: e for e in full["shards"][:2]}}
    (index / "manifest.partial.json").write_text(json.dumps(partial))
    kept = {e["file"]: (index / e["file"]).stat().st_mtime_ns for e in full["shards"][:2]}
    again = build_index(rows, meta, index, **quiet)
    assert {f: (index / f).stat().st_mtime_ns for f in kept} == kept  # not rebuilt
    assert sorted(again["fill"]["nodes"]) == [e["file"] for e in full["shards"][2:]]  # only the rest filled
    assert [e["sha256"] for e in again["shards"]] == [e["sha256"] for e in full["shards"]]
    assert not (index / "manifest.partial.json").exists()


def test_a_bad_row_found_by_a_task_fails_the_build_with_the_tasks_one_line_error(cluster):
    from reidscale.index.build import build_index
    from reidscale.index.job import open_precomputed_rows

    tmp = cluster["tmp"] / "bad"
    tmp.mkdir()
    x = _unit(np.random.default_rng(8).standard_normal((2000, 8)))
    x[1500, 2] = np.inf
    np.save(tmp / "g.npy", x)
    rows, meta, _ = open_precomputed_rows(tmp / "g.npy", normalize=False)
    with pytest.raises(ValueError, match=r"^\S*g\.npy: row 1500 \(1 row\) not finite") as info:
        build_index(rows, meta, tmp / "index", factory="Flat", num_shards=4, calibration=None, shard_tasks=True,
                    source=str(tmp / "g.npy"), log=lambda *_: None)
    assert "\n" not in str(info.value)
    assert not (tmp / "index" / "manifest.json").exists()
