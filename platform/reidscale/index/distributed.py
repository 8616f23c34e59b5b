"""A gallery served by Ray actors across nodes: each actor holds some shards, a client scatters.

``ShardServer`` (a plain class, usable without Ray) loads the shards it is given, each file's
sha256 checked against the manifest, and answers a query batch with each shard's hits, the
gallery's tombstones already applied (``hits.live_hits``). ``DistributedGallery`` starts one
``ShardServer`` actor per node (or ``num_actors``), deals the shards out by size (largest first,
to the actor holding the fewest vectors), sends every query batch to every actor and merges the
per-shard hits in manifest order with ``merge_topk`` (``hits.search_live``): the same ids and
scores as ``Gallery.search`` / ``search_identities`` on the same directory, because the same
functions run on the same shards.

Faults: an actor that dies is restarted by Ray (``max_restarts``) and reloads its shards, their
sha256 checked again. A query meanwhile waits up to ``wait_s`` for it; then it fails with a
``ShardsUnavailable`` naming the shards, unless the caller asked for ``allow_partial=True``, which
returns the hits of the shards that answered and their names of the ones that did not.

Changes: ``add`` / ``remove`` write and publish a new generation as ``Gallery``'s do (same
functions, same writer lock); ``refresh()`` loads the newest generation, whoever published it
(this client, a ``Gallery``, the service): new tombstones go to every actor, a new added shard
to the actor holding the fewest vectors. The client keeps the metadata (identity, camera, path per row)
to answer ``identities`` / ``cameras`` / ``paths`` locally. The directory must be a path every
node sees (a shared filesystem on a real cluster).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from reidscale.index import manifest as store
from reidscale import atomic
from reidscale.index.generation import (Snapshot, apply_search_params, checked_additions, load_shard,
                                        load_tombstones, read_metadata, with_added_shard, with_tombstones)
from reidscale.index.gallery import vectors_to_add
from reidscale.index.hits import live_hits, search_live, top_identities
from reidscale.index.manifest import GalleryError
from reidscale.index.metric import larger_is_closer
from reidscale.index.vectors import check_vectors

log = logging.getLogger(__name__)


class ShardsUnavailable(GalleryError):
    """Some shards did not answer in time (their actor is dead or restarting)."""

    def __init__(self, message: str, shards: list[str]):
        super().__init__(message)
        self.shards = shards


class PartialHits(NamedTuple):
    """What ``search(..., allow_partial=True)`` returns: hits of the shards that answered, and the missing ones."""

    scores: np.ndarray
    ids: np.ndarray
    missing: list[str]


class ShardServer:
    """Some shards of one gallery directory, loaded and searched in this process.

    ``shards``: ``[(position in the manifest, shard entry)]``; ``removed``: the manifest's
    tombstone entries; ``params``: the search-time settings. ``version`` names this state:
    ``search`` refuses a caller that expects another one (the actor was restarted with its
    first state), and the caller sends the state again with ``update``.
    """

    def __init__(self, directory: str, shards: list[tuple[int, dict]], removed: list[dict], params: dict,
                 metric: str, version: int = 0, verify: bool = True, mmap: bool = False):
        self.directory, self.verify, self.larger = Path(directory), verify, larger_is_closer(metric)
        self.mmap = mmap
        self._loaded: dict[tuple[str, str], object] = {}
        self.update(shards, removed, params, version)

    def update(self, shards: list[tuple[int, dict]], removed: list[dict], params: dict, version: int) -> int:
        loaded = {}
        for _, entry in shards:
            key = (entry["file"], entry["sha256"])
            loaded[key] = self._loaded.get(key) or load_shard(self.directory, entry, self.verify, self.mmap)
        self._loaded = loaded
        self.shards = [(pos, entry["file"], loaded[(entry["file"], entry["sha256"])]) for pos, entry in shards]
        apply_search_params([index for _, _, index in self.shards], params)
        self.removed = load_tombstones(self.directory, removed, self.verify)
        self.version = version
        log.info("%s: holding %s (%d vectors, %d tombstones), version %d", self.directory,
                 ", ".join(name for _, name, _ in self.shards) or "no shards",
                 sum(index.ntotal for _, _, index in self.shards), len(self.removed), version)
        return self.version

    def describe(self) -> dict:
        """Where this server runs and what it holds (the node id is "" outside Ray)."""
        import os

        node = ""
        try:
            import ray

            if ray.is_initialized():
                node = ray.get_runtime_context().get_node_id()
        except ImportError:
            pass
        return {"pid": os.getpid(), "node": node, "version": self.version,
                "shards": [name for _, name, _ in self.shards], "vectors": sum(i.ntotal for _, _, i in self.shards)}

    def search(self, queries: np.ndarray, k: int, version: int) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] | None:
        """``[(manifest position, scores, ids, more)]`` per shard held (``hits.live_hits``), or
        None when this server's state is not ``version``."""
        if version != self.version:
            return None
        return [(pos, *live_hits(*index.search(queries, k), self.removed, self.larger)) for pos, _, index in self.shards]


def assign_by_size(sizes: list[int], bins: int) -> list[list[int]]:
    """Positions of ``sizes`` dealt into ``bins`` lists: largest first, each to the lightest bin so far."""
    load = [0] * bins
    out: list[list[int]] = [[] for _ in range(bins)]
    for pos in sorted(range(len(sizes)), key=lambda p: (-sizes[p], p)):
        b = min(range(bins), key=lambda j: (load[j], j))
        out[b].append(pos)
        load[b] += sizes[pos]
    return [sorted(b) for b in out]


class DistributedGallery:
    """``Gallery``'s reading side over shard actors spread across a Ray cluster's nodes.

    ``num_actors`` (0: one per alive node) actors, each reserving ``actor_cpus`` CPUs (Ray sets
    the actor's OMP_NUM_THREADS, FAISS's threads, from it), placed round-robin over the alive
    nodes (soft node affinity: a restart prefers the same node).
    ``wait_s``: how long a query waits for a dead actor's restart before giving up.
    ``mmap``: each actor maps its shards from disk (``Gallery``'s ``mmap``): with both, a
    cluster serves more vectors than its nodes' memory. ``close()`` ends the actors.
    """

    def __init__(self, directory: str | Path, *, num_actors: int = 0, actor_cpus: float = 1.0, max_restarts: int = 3,
                 wait_s: float = 60.0, verify: bool = True, search_params: dict | None = None,
                 mmap: bool = False):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from reidscale.ray_runtime import init_ray

        self.directory = Path(directory).resolve()
        # joins RAY_ADDRESS (or starts a private Ray); nothing if Ray is up already
        init_ray(job_name=f"gallery-{self.directory.name}")
        self.verify, self.wait_s = verify, wait_s
        self._override = dict(search_params or {})
        self._tables: dict = {}
        self._version = 0
        manifest = store.read_manifest(self.directory)
        self._snap = self._snapshot(manifest)
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        count = num_actors or len(nodes)
        self._assigned = assign_by_size([e["ntotal"] for e in manifest["shards"]], count)
        server = ray.remote(ShardServer)
        self._actors = []
        for j, positions in enumerate(self._assigned):
            options = dict(num_cpus=actor_cpus, max_restarts=max_restarts, max_task_retries=0,
                           scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[j % len(nodes)], soft=True))
            self._actors.append(server.options(**options).remote(
                str(self.directory), [(p, manifest["shards"][p]) for p in positions], manifest.get("removed", []),
                self._params(manifest), manifest["metric"], self._version, verify, mmap))
        placement = self.describe_actors()  # waits for every actor to have loaded its shards
        for j, d in enumerate(placement):
            log.info("%s: actor %d on node %s holds %s (%d vectors)", self.directory, j, d["node"][:12],
                     ", ".join(d["shards"]) or "nothing", d["vectors"])

    # ------------------------------------------------------------------ state
    def _params(self, manifest: dict) -> dict:
        return {**manifest.get("search", {}), **self._override}

    def _snapshot(self, manifest: dict) -> Snapshot:
        removed = load_tombstones(self.directory, manifest.get("removed", []), self.verify)
        return Snapshot(manifest, [], removed, read_metadata(self.directory, manifest, self._tables, self.verify))

    def _state(self, j: int) -> tuple:
        m = self._snap.manifest
        return ([(p, m["shards"][p]) for p in self._assigned[j]], m.get("removed", []), self._params(m), self._version)

    def refresh(self) -> bool:
        """Load the newest published generation (tombstones to every actor, added shards to the lightest
        actor); True if it changed."""
        manifest = store.read_manifest(self.directory)
        if int(manifest.get("generation", 0)) == self._snap.generation:
            return False
        known = len(self._snap.manifest["shards"])
        shards = manifest["shards"]
        if [e["file"] for e in shards[:known]] != [e["file"] for e in self._snap.manifest["shards"]]:
            raise GalleryError(f"{self.directory}: generation {manifest.get('generation')} does not extend the shards "
                               "this gallery serves (rebuilt?); open it again")
        for pos in range(known, len(shards)):
            loads = [sum(shards[p]["ntotal"] for p in a) for a in self._assigned]
            self._assigned[loads.index(min(loads))].append(pos)
        self._snap = self._snapshot(manifest)
        self._version += 1
        self._gather("update", per_actor=self._state)
        return True

    @property
    def actors(self) -> list:
        """The shard actors' handles, in the order ``describe_actors`` lists them."""
        return list(self._actors)

    def describe_actors(self) -> list[dict]:
        """Per actor: its pid, node id, state version, shard files and vectors (``ShardsUnavailable`` if one is gone)."""
        out, failed = self._gather("describe")
        if failed:
            names = [self._snap.manifest["shards"][p]["file"] for j in sorted(failed) for p in self._assigned[j]]
            raise ShardsUnavailable(f"{self.directory}: actor(s) {sorted(failed)} unavailable "
                                    f"({'; '.join(failed.values())})", names)
        return [out[j] for j in range(len(self._actors))]

    # ------------------------------------------------------------------ writing
    def add(self, vectors: np.ndarray | None = None, identities=(), cameras=None, paths=None, *, images=None,
            model_dir=None) -> np.ndarray:
        """``Gallery.add`` (vectors, or images embedded here with the index's model): a new shard,
        published as a new generation and loaded by the actor holding the fewest vectors; returns
        the new row ids."""
        vectors, paths = vectors_to_add(self.directory, self.manifest, vectors, images, cameras, paths, model_dir)
        rows = checked_additions(vectors, identities, cameras, paths, self.dim, self.metric)
        if not len(rows.vectors):
            return np.zeros(0, np.int64)
        with store.writer_lock(self.directory):
            self.refresh()
            manifest, ids = with_added_shard(self.directory, self._snap.manifest, rows, self.verify)
            self._publish(manifest)
        return ids

    def remove(self, row_ids) -> int:
        """``Gallery.remove``: tombstones published as a new generation and sent to every actor; returns how
        many rows were removed (unknown or already removed ids are ignored)."""
        row_ids = np.unique(np.asarray(row_ids, dtype=np.int64).reshape(-1))
        with store.writer_lock(self.directory):
            self.refresh()
            _, found = self._snap.positions(row_ids)
            new = row_ids[found & ~np.isin(row_ids, self._snap.removed)]
            if len(new):
                self._publish(with_tombstones(self.directory, self._snap.manifest, new))
        return int(len(new))

    def _publish(self, manifest: dict) -> None:
        atomic.write_json(self.directory / store.MANIFEST, {**manifest, "format": store.INDEX_FORMAT})
        self.refresh()

    # ------------------------------------------------------------------ scatter / gather
    def _gather(self, method: str, *args, per_actor=None) -> tuple[dict, dict]:
        """({actor: result}, {actor: one-line reason}) of ``method`` on every actor, retrying an actor that
        died (Ray restarts it) until ``wait_s`` has passed. ``per_actor(j)``: that actor's arguments."""
        import ray

        def call(j):
            return getattr(self._actors[j], method).remote(*(per_actor(j) if per_actor else args))

        refs = {j: call(j) for j in range(len(self._actors))}
        out, failed = {}, {}
        deadline = time.monotonic() + self.wait_s
        for j in refs:
            while True:
                left = deadline - time.monotonic()
                try:
                    out[j] = ray.get(refs[j], timeout=max(left, 0.01))
                    break
                except ray.exceptions.GetTimeoutError:
                    failed[j] = f"no answer within {self.wait_s:g}s"
                    break
                except ray.exceptions.RayActorError as exc:
                    reason = _one_line(exc)
                    if left <= 0 or _actor_state(self._actors[j]) == "DEAD":
                        failed[j] = reason
                        break
                    time.sleep(min(0.25, max(left, 0)))
                    refs[j] = call(j)
        return out, failed

    def _search_shards(self, queries: np.ndarray, k: int, allow_partial: bool, missing: set) -> list:
        """Each shard's live hits in manifest order; a shard whose actor did not answer gives none."""
        larger = larger_is_closer(self.metric)
        empty = (np.full((len(queries), 0), -np.inf if larger else np.inf, np.float32),
                 np.zeros((len(queries), 0), np.int64), np.zeros(len(queries), bool))
        per_shard = [empty] * len(self._snap.manifest["shards"])
        for _ in range(2):
            out, failed = self._gather("search", queries, k, self._version)
            stale = [j for j, r in out.items() if r is None]
            if not stale:
                break
            # restarted with its first state: send the current one and ask again
            self._gather("update", per_actor=self._state)
        for j, hits in out.items():
            for pos, s, i, more in hits or []:
                per_shard[pos] = (s, i, more)
        lost = {j: failed.get(j, "stale state after a restart") for j in range(len(self._actors))
                if j in failed or out.get(j) is None}
        if lost:
            names = [self._snap.manifest["shards"][p]["file"] for j in sorted(lost) for p in self._assigned[j]]
            if not allow_partial:
                raise ShardsUnavailable(f"{self.directory}: shard(s) {', '.join(names)} unavailable "
                                        f"({'; '.join(f'actor {j}: {r}' for j, r in sorted(lost.items()))})", names)
            missing.update(names)
        return per_shard

    # ------------------------------------------------------------------ reading
    @property
    def manifest(self) -> dict:
        return self._snap.manifest

    @property
    def generation(self) -> int:
        return self._snap.generation

    @property
    def metric(self) -> str:
        return self._snap.manifest["metric"]

    @property
    def dim(self) -> int:
        return int(self._snap.manifest["dim"])

    @property
    def ntotal(self) -> int:
        """Vectors a search can return (removed ones excluded)."""
        return sum(int(e["ntotal"]) for e in self._snap.manifest["shards"]) - len(self._snap.removed)

    def search(self, queries: np.ndarray, k: int, *, allow_partial: bool = False):
        """``Gallery.search`` across the actors: (scores Q×k, row ids Q×k), best first.

        ``allow_partial``: instead of raising ``ShardsUnavailable``, return ``PartialHits``
        (scores, ids, missing shard names) over the shards that answered.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be Q×{self.dim}, got {queries.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        check_vectors(queries, "queries", self.metric)
        missing: set[str] = set()
        scores, ids = search_live(lambda q, fetch: self._search_shards(q, fetch, allow_partial, missing),
                                  len(self._snap.removed), queries, k, larger_is_closer(self.metric))
        if allow_partial:
            if missing:
                log.warning("%s: searched without %s", self.directory, ", ".join(sorted(missing)))
            return PartialHits(scores, ids, sorted(missing))
        return scores, ids

    def search_identities(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``Gallery.search_identities`` across the actors (all shards must answer)."""
        return top_identities(self, queries, k)

    def live_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """(identity, camera) of every row a search can return now, in row-id order (as ``Gallery``)."""
        return self._snap.live_labels()

    def identities(self, row_ids: np.ndarray) -> np.ndarray:
        """Identity per row id (-1: no hit or unknown), from the metadata this client holds."""
        return self._snap.identities(row_ids)

    def cameras(self, row_ids: np.ndarray) -> np.ndarray:
        return self._snap.cameras(row_ids)

    def paths(self, row_ids: np.ndarray) -> np.ndarray:
        return self._snap.paths(row_ids)

    def close(self) -> None:
        """End the actors (without restart)."""
        import ray

        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []


def _one_line(exc: Exception) -> str:
    """Why an actor call failed, in one line: the error its constructor raised (a shard that no longer
    matches its sha256, say) when Ray's message carries one, else Ray's first line."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    raised = [line for line in lines if "Error: " in line and not line.startswith("ray.exceptions")]
    return (raised[-1] if raised else lines[0] if lines else type(exc).__name__)[:300]


def _actor_state(actor) -> str:
    """The GCS's state of an actor ("ALIVE", "RESTARTING", "DEAD", ...), "" if it cannot tell."""
    try:
        from ray._private.state import state

        info = state.actor_table(actor._actor_id.hex())
        return str(info.get("State", "")) if info else ""
    except Exception:  # a private API: without it the caller waits out its deadline instead
        return ""
