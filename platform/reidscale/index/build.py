"""Build a sharded FAISS gallery index from embedding vectors.

Output directory::

    trained.faiss            the trained, empty index (coarse centroids, PQ codebooks):
                             every shard, and every shard ``Gallery.add`` writes later,
                             is a copy of it, so all shards share one quantizer
    shard-00000.faiss ...    one FAISS index per shard, ids = int64 gallery row ids
    metadata.parquet         row_id, identity, camera, path (never inside FAISS)
    manifest.json            written last: model hash, dim, metric, factory, search-time
                             parameters, per-shard ntotal, id range and sha256

Every file is written under a temporary name and renamed (see ``manifest``); a directory
without a manifest is an unfinished build, and ``Gallery`` refuses it. An interrupted
build leaves ``manifest.partial.json`` listing the shards it finished; re-running with
the same inputs keeps them (checked by sha256 of the file and of the shard's inputs).

Each shard is checked, hashed and filled by plain functions (``shard_digest``,
``fill_shard_file``) that read only that shard's rows; ``shard_tasks=True`` runs them as Ray
tasks spread over the cluster's nodes (``_run_each`` is the whole Ray layer), otherwise they
run here, one after the other. Either way the shard files are the same bytes. With vectors
given as an ``index.rows`` source (files on disk) the driver never holds them all: it reads a
training sample, and the tasks read their own rows. Tasks write into ``out_dir`` directly,
so on a cluster of several machines it must be a directory every node sees at the same path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from reidscale import atomic
from reidscale.index import manifest as store
from reidscale.index.calibrate import CalibrationSpec
from reidscale.index.metric import check_gallery_metric, faiss_metric
from reidscale.index.rows import RowRange
from reidscale.index.vectors import check_vectors

# _log, not log: build_index takes a ``log=`` callable, which would shadow it
_log = logging.getLogger(__name__)

# Exact search while it is cheap: 131k × 512-d is ~1.3 ms/query on 2 cores.
FLAT_MAX_ROWS = 1 << 17
ADD_CHUNK = 1 << 16


def _nlist(n: int) -> int:
    """Coarse cells: a power of two near sqrt(n) (1024 at 1M), at least 16."""
    return max(16, 1 << int(round(np.log2(np.sqrt(max(n, 1))))))


def _pq_m(dim: int, codes_budget: float) -> int | None:
    """PQ sub-quantizers for 4-bit fast-scan codes (m/2 bytes/vector): 2 dims per code if it fits."""
    for dims_per_code in (2, 4, 8, 16):
        if dim % dims_per_code == 0 and (dim // dims_per_code) % 2 == 0 and (dim // dims_per_code) / 2 <= codes_budget:
            return dim // dims_per_code
    return None


def choose_factory(n: int, dim: int, memory_budget_bytes: int = 8 << 30) -> str:
    """The FAISS factory string for ``n`` vectors of ``dim`` under a memory budget (bytes).

    The budget is what the loaded index may occupy (it is resident while searching):

    * ``Flat`` (exact) up to ``FLAT_MAX_ROWS`` when the raw vectors fit;
    * above, IVF with 4-bit fast-scan PQ codes (scanned in SIMD registers, so probing
      many cells is cheap) and a re-ranking of the PQ shortlist with exact distances:
      raw float32 vectors (``RFlat``) when they fit, 8-bit scalar-quantised ones
      (``Refine(SQ8)``, 4× smaller) when only those fit, none when neither does.

    IVF-Flat is not chosen: its scan is bound by memory bandwidth (4·dim bytes per
    vector visited), and at 1M × 512-d it could not reach 20× the exact search's
    throughput at 0.95 recall on this machine (docs/benchmarks.md). Force it, or HNSW,
    with a factory string. ``nlist`` ≈ √n: four times more cells cost ~3× the build and
    gave the same speed at the same recall at 1M on three distributions ("Index calibration
    at 1M"); the search settings come from calibration on the user's own vectors.
    """
    ids_bytes = 16 * n  # int64 id in the inverted list + IndexIDMap2's reverse map
    raw = n * dim * 4
    if n <= FLAT_MAX_ROWS and raw + ids_bytes <= memory_budget_bytes:
        return "Flat"
    nlist = _nlist(n)
    for refine, refine_bytes in (("RFlat", raw), ("Refine(SQ8)", n * dim)):
        m = _pq_m(dim, (memory_budget_bytes - refine_bytes - ids_bytes) / max(n, 1))
        if m is not None and refine_bytes + n * m / 2 + ids_bytes <= memory_budget_bytes:
            return f"IVF{nlist},PQ{m}x4fs,{refine}"
    m = _pq_m(dim, (memory_budget_bytes - ids_bytes) / max(n, 1))
    if m is None:
        raise ValueError(f"memory budget {memory_budget_bytes / 2**30:.2f} GiB is too small for {n} vectors")
    return f"IVF{nlist},PQ{m}x4fs"


def default_search_params(factory: str, n: int) -> dict:
    """Search-time settings stored in the manifest when calibration is off (FAISS ``ParameterSpace`` names).

    A fixed rule holds only for data like the data it was measured on: on identity
    embeddings whose centres spread over ~50 effective dimensions it gave recall@10 0.69
    at 300k (issue 13), so builds calibrate by default (``reidscale.index.calibrate``) and
    this is what ``calibration=None`` / ``calibrate=false`` keeps.

    ``nprobe`` cells of the ``nlist`` are scanned; ``k_factor_rf`` × k PQ candidates per
    shard are re-ranked with exact distances. Measured on identity-structured 512-d
    embeddings at 1M with IVF1024,PQ256x4fs,RFlat (bench/index_scale.py, docs/benchmarks.md):
    nprobe 16 / k_factor_rf 16 gives recall@10 0.965 of exact search at ~55× its queries/s;
    nprobe 32 gives 0.984 at ~38×; nprobe 12 or k_factor_rf 8 fall below 0.95. At least 16
    cells, because smaller galleries have fewer neighbours per cell (IVF256 at 100k: 0.991
    with 16, 0.957 with 8).
    """
    params = {}
    if factory.startswith("IVF"):
        nlist = int(factory[3:].split(",")[0].split("_")[0])
        params["nprobe"] = min(nlist, max(16, nlist // 64))
    if "HNSW" in factory:
        params["efSearch"] = 128
    if "RFlat" in factory or "Refine(" in factory:
        params["k_factor_rf"] = 16
    return params


def params_string(params: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(params.items()))


def train_empty_index(vectors: np.ndarray, factory: str, metric: str, *, train_size: int = 0, seed: int = 0):
    """An empty index from ``factory``, trained on a uniform sample of ``vectors`` when it needs training."""
    import faiss

    dim = vectors.shape[1]
    try:
        index = faiss.index_factory(dim, factory, faiss_metric(metric))
    except RuntimeError as exc:
        raise ValueError(f"factory {factory!r} does not make an index of dimension {dim}: {exc}") from None
    if not index.is_trained:
        n = len(vectors)
        if not train_size:
            ivf = faiss.try_extract_index_ivf(index)
            # 64 points per coarse cell is plenty for k-means; more only costs time
            train_size = 64 * ivf.nlist if ivf is not None else 65_536
        take = np.sort(np.random.default_rng(seed).choice(n, min(n, max(train_size, 1)), replace=False))
        index.train(np.ascontiguousarray(vectors[take], dtype=np.float32))
    return index


def fill_shard(empty, vectors: np.ndarray, ids: np.ndarray, progress=None):
    """A copy of the trained ``empty`` index holding ``vectors`` under int64 ``ids``."""
    import faiss

    index = faiss.IndexIDMap2(faiss.clone_index(empty))
    for lo in range(0, len(ids), ADD_CHUNK):
        chunk = np.ascontiguousarray(vectors[lo : lo + ADD_CHUNK], dtype=np.float32)
        index.add_with_ids(chunk, np.ascontiguousarray(ids[lo : lo + ADD_CHUNK], dtype=np.int64))
        if progress is not None:
            progress(len(chunk))
    return index


def shard_digest(vectors, lo: int, hi: int, ids: np.ndarray, metric: str, source: str) -> str:
    """sha256 of one shard's inputs (its int64 ids, then its rows ``lo:hi`` of ``vectors``), after
    refusing non-finite or zero-norm rows (named by their row in ``vectors``). Reads in chunks."""
    check_vectors(vectors, source, metric, lo=lo, hi=hi)
    digest = hashlib.sha256()
    digest.update(memoryview(np.ascontiguousarray(ids)).cast("B"))
    for a in range(lo, hi, ADD_CHUNK):  # the same bytes as hashing rows lo:hi at once
        digest.update(memoryview(np.ascontiguousarray(vectors[a : min(a + ADD_CHUNK, hi)])).cast("B"))
    return digest.hexdigest()


def fill_shard_file(out_dir: str | Path, name: str, trained: dict, vectors, lo: int, hi: int, ids: np.ndarray,
                    input_sha256: str) -> dict:
    """Rows ``lo:hi`` of ``vectors`` (under ``ids``) added to a copy of ``out_dir/trained.faiss``
    (checked against ``trained["sha256"]``), written atomically as ``out_dir/name``; returns
    the shard's manifest entry. Memory: the shard's index, plus ``ADD_CHUNK`` rows read at a time."""
    import faiss

    out_dir = Path(out_dir)
    empty = faiss.read_index(str(store.verified(out_dir, trained)))
    index = fill_shard(empty, RowRange(vectors, lo, hi), ids)
    entry = {
        "file": name,
        "ntotal": int(index.ntotal),
        "id_min": int(ids.min()) if hi > lo else None,
        "id_max": int(ids.max()) if hi > lo else None,
        "input_sha256": input_sha256,
        "sha256": store.write_index(index, out_dir / name),
    }
    _log.info("%s: filled %d vectors", out_dir / name, entry["ntotal"])
    return entry


def _on_node(fn, *args):
    """(the Ray node this runs on, ``fn(*args)``): the build records where each shard was filled."""
    import ray

    return ray.get_runtime_context().get_node_id(), fn(*args)


def _run_each(fn, calls: list[tuple], ray_tasks: bool, job_name: str = ""):
    """Yield ``(i, node, fn(*calls[i]))``: here, in order (node ""), or as Ray tasks spread over
    the nodes, in the order they finish. An ``np.ndarray`` argument is put in Ray's object store once.
    ``job_name`` names the Ray job if this starts or joins Ray (the dashboard's Name column)."""
    if not ray_tasks:
        for i, args in enumerate(calls):
            yield i, "", fn(*args)
        return
    import ray

    from reidscale.ray_runtime import init_ray

    init_ray(job_name=job_name)
    shared: dict[int, object] = {}

    def ref(a):
        if isinstance(a, np.ndarray) and a.nbytes > 1 << 20:
            if id(a) not in shared:
                shared[id(a)] = ray.put(a)
            return shared[id(a)]
        return a

    task = ray.remote(_on_node).options(num_cpus=1, scheduling_strategy="SPREAD")
    pending = {task.remote(fn, *map(ref, args)): i for i, args in enumerate(calls)}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for r in done:
                i = pending.pop(r)
                try:
                    node, result = ray.get(r)
                except ray.exceptions.RayTaskError as exc:
                    # the task's own error (a bad row, a missing file), not Ray's multi-line wrapper
                    raise (exc.cause if isinstance(exc.cause, Exception) else exc) from None
                yield i, node, result
    finally:
        for r in pending:  # a failed or abandoned build leaves nothing running
            ray.cancel(r)


def _table_hash(table: pa.Table) -> str:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue()).hexdigest()


def build_index(
    vectors: np.ndarray,
    metadata: pa.Table,
    out_dir: str | Path,
    *,
    factory: str = "auto",
    metric: str = "ip",
    num_shards: int = 1,
    model_sha256: str = "",
    memory_budget_bytes: int = 8 << 30,
    search_params: dict | None = None,
    train_size: int = 0,
    extra: dict | None = None,
    calibration: CalibrationSpec | None = CalibrationSpec(),
    calibration_queries: np.ndarray | None = None,
    model_dir: str | Path | None = None,
    source: str = "gallery vectors",
    shard_tasks: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Build ``num_shards`` shards over rows in ``metadata`` order; return the manifest.

    Unless ``search_params`` are given or ``calibration`` is None, the search settings are
    then calibrated (``reidscale.index.calibrate``) on ``calibration_queries`` or a sample
    of the gallery's rows, and the report is stored in the manifest (``calibration``) and
    drawn in ``calibration.png``. ``model_dir``: the exported model that made the vectors,
    recorded relative to ``out_dir`` with its weights file's sha256. ``source`` names the
    vectors in errors (non-finite or zero-norm rows are refused).

    ``shard_tasks``: check, hash and fill each shard in a Ray task (``init_ray`` joins
    ``RAY_ADDRESS`` or starts a private Ray); the manifest's ``fill`` says on which node.

    ``log``: where the build's progress lines go (trained, reused, calibrated, kept); default
    this module's logger at INFO, so the job's logging setup decides what reaches the console.

    ``vectors`` (N×D float32: an array, a ``np.memmap``, or an ``index.rows`` source that
    reads rows from files as asked) row i belongs to ``metadata`` row i,
    whose ``row_id`` is the id stored in FAISS. Shards are contiguous row ranges. A
    directory already holding a complete index of the same inputs is left as it is
    (with any later ``add``/``remove``); shards finished by an interrupted build of the
    same inputs are kept.
    """
    say = log or _log.info
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    job_name = f"build_index-{out_dir.name}"  # as jobs/build_index.py names its embedding step
    ids = _checked_ids(vectors, metadata, metric, source)
    if calibration is not None:
        calibration.validate()
    n, dim = vectors.shape
    requested = factory
    if factory == "auto":
        factory = choose_factory(n, dim, memory_budget_bytes)
    params = {**default_search_params(factory, n), **(search_params or {})}
    t0 = time.time()
    bounds = np.linspace(0, n, num_shards + 1).astype(int)
    ranges = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
    shard_inputs = [""] * num_shards
    for s, _, digest in _run_each(shard_digest, [(vectors, lo, hi, ids[lo:hi], metric, source) for lo, hi in ranges],
                                  shard_tasks, job_name):
        shard_inputs[s] = digest
    build_key = hashlib.sha256(json.dumps(
        [factory, metric, model_sha256, int(dim), train_size, shard_inputs, _table_hash(metadata)]).encode()).hexdigest()

    done = _finished_build(out_dir, build_key, calibration, calibration_queries, search_params, say)
    if done is not None:
        return done

    partial_path = out_dir / "manifest.partial.json"
    partial = json.loads(partial_path.read_text()) if partial_path.is_file() else {}
    if partial.get("build_key") != build_key:
        partial = {"build_key": build_key, "shards": {}}
    (out_dir / store.MANIFEST).unlink(missing_ok=True)  # from here on the directory is an unfinished build
    trained = _trained_index(out_dir, partial, vectors, factory, metric, train_size, say)
    shard_entries, nodes = _filled_shards(out_dir, partial, trained, vectors, ids, ranges, shard_inputs, factory,
                                          shard_tasks, job_name)
    meta_sha = store.write_table(metadata, out_dir / "metadata.parquet")
    manifest = {
        "format": store.INDEX_FORMAT,
        "generation": 0,
        "build_key": build_key,
        "dim": int(dim),
        "metric": metric,
        "factory": factory,
        "factory_requested": requested,
        "memory_budget_bytes": int(memory_budget_bytes),
        "search": params,
        "ntotal": int(n),
        "next_row_id": int(ids.max()) + 1,
        "model_sha256": model_sha256,
        "trained": trained,
        "shards": shard_entries,
        "metadata": {"file": "metadata.parquet", "sha256": meta_sha, "rows": len(metadata)},
        "removed": [],
        "build_time_s": time.time() - t0,
        **(extra or {}),
        **(_model_record(model_dir, out_dir) if model_dir else {}),
        **({"fill": {"executor": "ray", "nodes": nodes}} if shard_tasks else {}),
    }
    if calibration is not None and not search_params:
        manifest = _calibrated(manifest, out_dir, vectors, ids, calibration, calibration_queries, say)
    atomic.write_json(out_dir / store.MANIFEST, manifest)
    partial_path.unlink(missing_ok=True)
    return manifest


def _checked_ids(vectors: np.ndarray, metadata: pa.Table, metric: str, source: str) -> np.ndarray:
    """The FAISS ids (``metadata.row_id``) after refusing what would build a wrong index."""
    n = vectors.shape[0]
    if len(metadata) != n:
        raise ValueError(f"{n} vectors but {len(metadata)} metadata rows")
    if n == 0:
        raise ValueError("no vectors to index")
    check_gallery_metric(metric)
    ids = metadata.column("row_id").to_numpy().astype(np.int64)
    if len(np.unique(ids)) != n:
        raise ValueError("row_id values are not unique")
    if ids.min() < 0:
        raise ValueError("row_id values must be >= 0 (FAISS uses -1 for 'no hit')")
    # the vectors themselves are checked shard by shard, where they are read (shard_digest)
    return ids


def _finished_build(out_dir: Path, build_key: str, calibration, calibration_queries, search_params,
                    say: Callable[[str], None]) -> dict | None:
    """The manifest of a complete index of the same inputs already in ``out_dir`` (recalibrated
    when the calibration settings changed), or None when there is something to build."""
    try:
        current = store.read_manifest(out_dir)
    except store.GalleryError:
        return None
    if current.get("build_key") != build_key:
        return None
    say(f"index {out_dir}: already built from these inputs (generation {current.get('generation', 0)}); kept")
    old = current.get("calibration") or {}
    if calibration is not None and not search_params and (
            calibration_queries is not None
            or any(old.get(f) != v for f, v in vars(calibration).items() if f != "sample")):
        from reidscale.index.gallery import Gallery  # gallery.py imports this module

        say(f"index {out_dir}: calibration settings changed; recalibrating")
        Gallery(out_dir).calibrate(calibration_queries, calibration)
        return store.read_manifest(out_dir)
    return current


def _trained_index(out_dir: Path, partial: dict, vectors: np.ndarray, factory: str, metric: str, train_size: int,
                   say: Callable[[str], None]) -> dict:
    """The manifest entry of ``trained.faiss``, the trained empty index: an interrupted build's,
    if intact, else trained now (on a sample: only the sample is read)."""
    trained = partial.get("trained")
    if trained and _intact(out_dir, trained):
        say(f"index {out_dir}: reusing trained {factory} from the interrupted build")
        return trained
    t_train = time.time()
    empty = train_empty_index(vectors, factory, metric, train_size=train_size)
    trained = {"file": "trained.faiss", "sha256": store.write_index(empty, out_dir / "trained.faiss")}
    partial["trained"] = trained
    atomic.write_json(out_dir / "manifest.partial.json", partial)
    say(f"index {out_dir}: trained {factory} in {time.time() - t_train:.1f}s")
    return trained


def _filled_shards(out_dir: Path, partial: dict, trained: dict, vectors, ids: np.ndarray, ranges: list[tuple[int, int]],
                   shard_inputs: list[str], factory: str, shard_tasks: bool,
                   job_name: str = "") -> tuple[list[dict], dict]:
    """(manifest entries, node per shard filled by a Ray task): each row range filled by
    ``fill_shard_file``; a shard an interrupted build of the same rows finished (and that is
    intact) is kept. Each finished shard is recorded in the partial manifest at once, so a crash
    loses only the shards being filled."""
    from reidscale.progress import progress_bar

    entries: list[dict | None] = [None] * len(ranges)
    todo = []
    for s, (lo, hi) in enumerate(ranges):
        name = f"shard-{s:05d}.faiss"
        prev = partial["shards"].get(name)
        if prev and prev["input_sha256"] == shard_inputs[s] and _intact(out_dir, prev):
            entries[s] = prev
        else:
            todo.append(s)
    calls = [(out_dir, f"shard-{s:05d}.faiss", trained, vectors, ranges[s][0], ranges[s][1],
              ids[ranges[s][0]:ranges[s][1]], shard_inputs[s]) for s in todo]
    nodes = {}
    with progress_bar(len(ids), f"index {factory}", "vec") as bar:
        bar.update(sum(hi - lo for s, (lo, hi) in enumerate(ranges) if entries[s] is not None))
        for i, node, entry in _run_each(fill_shard_file, calls, shard_tasks, job_name):
            s = todo[i]
            entries[s] = entry
            if node:
                nodes[entry["file"]] = node
            partial["shards"][entry["file"]] = entry
            atomic.write_json(out_dir / "manifest.partial.json", partial)
            bar.update(ranges[s][1] - ranges[s][0])
    return entries, nodes


def _model_record(model_dir: str | Path, out_dir: Path) -> dict:
    """Where the model that made the vectors is, relative to the index (so an index copied with
    its model still finds it, issue 12), and its weights file's sha256 (checked at open)."""
    weights = Path(model_dir) / "model.safetensors"
    return {"model_dir": os.path.relpath(Path(model_dir).resolve(), out_dir.resolve()),
            "model_weights_sha256": atomic.sha256_file(weights) if weights.is_file() else ""}


def _calibrated(manifest: dict, out_dir: Path, vectors: np.ndarray, ids: np.ndarray, spec: CalibrationSpec,
                queries: np.ndarray | None, say: Callable[[str], None]) -> dict:
    """``manifest`` with calibrated ``search`` settings and the ``calibration`` report (not yet published)."""
    from reidscale.index.calibrate import plot_tradeoff
    from reidscale.index.gallery import Gallery

    # open what was just written, as a reader will; ground truth is the input vectors themselves.
    # Mapped, not read: the shards the tasks wrote never need to fit in this process's memory
    # (the kernel's page cache holds what the trial searches touch)
    gallery = Gallery(out_dir, verify=False, manifest=manifest, mmap=True)
    report = gallery.measure_settings([(vectors, ids)], spec, queries=queries,
                                      budget_bytes=manifest["memory_budget_bytes"])
    report["generation"] = int(manifest["generation"])
    plot_tradeoff(report, out_dir / "calibration.png")
    line = (f"index {out_dir}: calibrated {manifest['factory']} on {report['sample']} {report['queries_source']}: "
            f"{params_string(report['chosen']) or '(no settings)'} recall@{spec.recall_k} {report['recall_at_k']:.4f} "
            f"recall@1 {report['recall_at_1']:.4f} {report['qps']:.0f} q/s ({len(report['tried'])} settings, "
            f"{report['time_s']:.1f}s)")
    say(line)
    if not report["reached"]:
        say(report["message"])
    return {**manifest, "search": report["chosen"], "calibration": report}


def _intact(directory: Path, entry: dict) -> bool:
    try:
        store.verified(directory, entry)
        return True
    except store.GalleryError:
        return False
