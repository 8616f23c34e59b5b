"""The four embedders (Ray Data actor, in-process, serve, in-training validation) share one forward
pass (reidscale.models.inference); each must give the vectors of a plain decode + model call."""

import io
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from reidscale.data.transforms import TransformConfig, decode_batch
from reidscale.models.backbone import ModelConfig

SIE = replace(ModelConfig(width=32, layers=1, heads=2, patch_size=8, embed_dim=16), sie_cameras=3)
SIZE = TransformConfig(height=32, width=16)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from reidscale.models.reid import build_reid_model, export_embedding_model

    torch.manual_seed(0)
    model = build_reid_model(SIE, SIZE, num_classes=4)
    with torch.no_grad():  # SIE rows start near zero; make the cameras clearly different
        model.embedding.backbone.sie_embed.normal_()
    return export_embedding_model(model.embedding, SIE, SIZE, tmp_path_factory.mktemp("model") / "export")


@pytest.fixture(scope="module")
def jpegs():
    rng = np.random.default_rng(0)
    out = []
    for _ in range(5):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 16, 3), dtype=np.uint8)).save(buf, format="JPEG")
        out.append(buf.getvalue())
    return out


CAMERAS = np.array([0, 1, 2, 1, 0])


def _reference(export, jpegs):
    """Independent of the code under test: the eval decode and one model call with the cameras."""
    from reidscale.models.reid import load_embedding_model

    model, _ = load_embedding_model(export)
    x = torch.from_numpy(decode_batch({"image": np.array(jpegs, dtype=object)}, SIZE, train=False)["image"])
    with torch.no_grad():
        return model, model(x, cameras=torch.from_numpy(CAMERAS)).numpy(), model(x).numpy()


def test_every_embedder_gives_the_plain_model_vectors_with_each_images_camera(export, jpegs):
    from reidscale.embed import Embedder, embed_images
    from reidscale.serve.embedder import ImageEmbedder
    from reidscale.train.validation import _embed_part

    model, want, without_cameras = _reference(export, jpegs)
    assert np.abs(want - without_cameras).max() > 1e-4  # the cameras matter, so passing them is tested

    in_process, ok = embed_images(export, jpegs, batch_size=2, cameras=CAMERAS)
    assert ok.all()
    served = ImageEmbedder(str(export))(jpegs, list(CAMERAS))
    validation = _embed_part(model, pa.table({"image": pa.array(jpegs, pa.binary()),
                                              "camera": pa.array(CAMERAS, pa.int32())}),
                             SIZE, torch.device("cpu"), torch.float32, batch_size=3)
    # what embed.decoded's Ray Data tasks ship: uint8, normalised on the actor's device
    decoded = decode_batch({"image": np.array(jpegs, dtype=object)}, SIZE, train=False, normalise=False)
    actor = Embedder(str(export))({"image": decoded["image"], "camera": CAMERAS, "row_id": np.arange(5)})
    for got in (in_process, np.stack(served), validation, actor["embedding"]):
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(actor["row_id"], np.arange(5))


def test_undecodable_images_are_flagged_not_embedded(export, jpegs):
    from reidscale.embed import embed_images
    from reidscale.serve.embedder import ImageEmbedder

    images = [jpegs[0], b"not an image", jpegs[1]]
    vectors, ok = embed_images(export, images, cameras=[0, 1, 2])
    assert ok.tolist() == [True, False, True] and not vectors[1].any()
    served = ImageEmbedder(str(export))(images, [0, 1, 2])
    assert served[1] is None and served[0] is not None
    np.testing.assert_allclose(served[0], vectors[0], atol=1e-5)


@pytest.fixture
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def test_the_ray_embedding_job_streams_row_groups_to_separate_actors_and_matches_in_process(tmp_path, export,
                                                                                           local_ray):
    """embed_split (build_index's path): one decode task per row group, not fused into the actor
    (fused, each actor decoded between model calls), and the same vectors as the in-process path."""
    from reidscale.data.pipeline import row_groups
    from reidscale.data.shards import write_dataset
    from reidscale.data.sources.synthetic import SyntheticConfig, generate
    from reidscale.embed import EmbedConfig, _embedding_dataset, embed_split, embed_split_in_process, read_embeddings
    from reidscale.models.reid import load_embedding_model

    data = tmp_path / "data"
    records = [dict(r, camera=r["camera"] % 3) for r in generate(SyntheticConfig(num_identities=12, height=32, width=16))]
    write_dataset(records, data, source="synthetic", rows_per_group=8, groups_per_shard=2)
    groups = row_groups(data, "gallery")
    assert len(groups) >= 3
    ds = _embedding_dataset(export, load_embedding_model(export)[1], data, "gallery", EmbedConfig(batch_size=4), "")
    blocks = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    stats = ds.stats()
    assert "MapBatches(read_decode_row_groups): " in stats and "MapBatches(Embedder): " in stats, stats
    assert "->MapBatches(Embedder)" not in stats  # a fused operator's name joins its parts with ->
    assert sum(len(b["row_id"]) for b in blocks) == sum(g.rows for g in groups)

    cfg = EmbedConfig(batch_size=4, torch_threads=1)
    stats = embed_split(export, data, "gallery", tmp_path / "emb", cfg)
    vectors, meta = read_embeddings(tmp_path / "emb")
    want, want_meta = embed_split_in_process(export, data, "gallery")
    order = np.argsort(meta.column("row_id").to_numpy())
    np.testing.assert_array_equal(meta.column("row_id").to_numpy()[order], want_meta.column("row_id").to_numpy())
    np.testing.assert_allclose(vectors[order], want, atol=1e-5)
    assert stats["embedded"] == len(want) and stats["decode_errors"] == 0


def _cmdline(proc) -> str:
    import psutil

    try:
        return " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def test_an_embedding_actor_killed_mid_split_is_restarted_and_no_row_is_lost_or_repeated(tmp_path, export,
                                                                                        local_ray):
    """Ray Data restarts a crashed actor of its pool and retries the batches it held (its default
    for actor pools, which embed_split keeps): the pool's one actor SIGKILLed once the first
    batch is back costs a model reload, not the job, and every row is embedded exactly once."""
    import psutil

    from reidscale.data.shards import read_manifest, write_dataset
    from reidscale.data.sources.synthetic import SyntheticConfig, generate
    from reidscale.embed import EmbedConfig, embed_split, embed_split_in_process, read_embeddings

    data = tmp_path / "data"
    records = [dict(r, camera=r["camera"] % 3) for r in generate(SyntheticConfig(num_identities=120, height=32, width=16))]
    # ~70 row groups, decoded one at a time beside the actor: seconds of work left after the first batch
    write_dataset(records, data, source="synthetic", rows_per_group=8, groups_per_shard=4)
    total = read_manifest(data)["splits"]["gallery"]["images"]
    killed = []

    def kill_the_actor_once(rows_done: int) -> None:
        if killed:
            return
        # this test's Ray only: its processes are children of this one (ray.init started it)
        actors = [p for p in psutil.Process().children(recursive=True) if "Embedder" in _cmdline(p)]
        assert len(actors) == 1, [_cmdline(p) for p in actors]
        actors[0].kill()
        actors[0].wait(30)
        killed.append((actors[0].pid, rows_done))

    stats = embed_split(export, data, "gallery", tmp_path / "emb", EmbedConfig(batch_size=4, torch_threads=1),
                        on_batch=kill_the_actor_once)
    assert killed and killed[0][1] < total
    vectors, meta = read_embeddings(tmp_path / "emb")
    want, want_meta = embed_split_in_process(export, data, "gallery")
    row_ids = meta.column("row_id").to_numpy()
    assert len(np.unique(row_ids)) == len(row_ids) == len(want) == total == stats["embedded"]
    order = np.argsort(row_ids)
    np.testing.assert_array_equal(row_ids[order], want_meta.column("row_id").to_numpy())
    np.testing.assert_allclose(vectors[order], want, atol=1e-5)
    # the killed process embedded the first rows, its restart (a new process) the rest
    pids = {int(a["actor"].rsplit(":", 1)[1]) for a in stats["per_actor"]}
    assert killed[0][0] in pids and len(pids) == 2, stats["per_actor"]


def test_embedding_actor_threads_default_to_the_cluster_share():
    from reidscale.embed import EmbedConfig, actor_threads

    assert actor_threads(EmbedConfig(), 2.0, use_gpu=False) == 2  # one actor on two cores: both
    assert actor_threads(EmbedConfig(num_actors=3), 8.0, use_gpu=False) == 2
    assert actor_threads(EmbedConfig(num_actors=4), 2.0, use_gpu=False) == 1
    assert actor_threads(EmbedConfig(torch_threads=3), 2.0, use_gpu=False) == 3
    assert actor_threads(EmbedConfig(cpus_per_actor=4), 64.0, use_gpu=True) == 4
