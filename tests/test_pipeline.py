"""Per-worker streams of decode tasks: disjoint, whole identities, reproducible."""

import numpy as np
import pytest
import torch

from reidscale.data.pipeline import (EpochBlocks, PKStream, RowGroup, decode_tasks, epoch_assignment,
                                     ordered_stream, row_groups, tasks_in_flight, worker_epochs, worker_stream)
from reidscale.data.shards import write_dataset
from reidscale.data.sources.synthetic import SyntheticConfig, generate
from reidscale.data.transforms import TransformConfig, decode_batch
from reidscale.models.inference import model_input, normalise_on_device

CFG = TransformConfig(height=32, width=16, pad=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import ray

    root = tmp_path_factory.mktemp("pipe")
    write_dataset(generate(SyntheticConfig(num_identities=30, height=32, width=16, images_per_identity_median=6)),
                  root, source="synthetic", rows_per_group=12, groups_per_shard=4)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield root
    ray.shutdown()


def _epoch_batches(root, epoch, rank, world, seed=0, rows_per_task=1, window=None):
    """One epoch's batches from a stream of that epoch alone."""
    blocks = worker_epochs(row_groups(root, "train"), CFG, epochs=range(epoch, epoch + 1), seed=seed, rank=rank,
                           world=world, rows_per_task=rows_per_task)
    stream = PKStream(4, 2, seed=seed * 1_000_003 + rank, window_identities=window)
    return [b for b in stream.epoch(blocks.epoch(epoch), epoch)]


def test_workers_get_disjoint_rows_and_never_split_an_identity(data):
    groups = row_groups(data, "train")
    a = epoch_assignment(groups, 0, 0, 0, 2)
    b = epoch_assignment(groups, 0, 0, 1, 2)
    assert {i for i, _ in a}.isdisjoint({i for i, _ in b})
    assert len(a) + len(b) == len(groups)
    rows = [set(np.concatenate([x["row_id"] for x in _epoch_batches(data, 0, r, 2)]).tolist()) for r in (0, 1)]
    assert rows[0].isdisjoint(rows[1])
    ids = [set(np.concatenate([x["identity"] for x in _epoch_batches(data, 0, r, 2)]).tolist()) for r in (0, 1)]
    assert ids[0].isdisjoint(ids[1])


def test_same_seed_and_epoch_give_the_same_batches_and_images(data):
    first = _epoch_batches(data, 1, 0, 2)
    second = _epoch_batches(data, 1, 0, 2)
    assert [b["row_id"].tolist() for b in first] == [b["row_id"].tolist() for b in second]
    np.testing.assert_array_equal(first[0]["image"], second[0]["image"])  # augmentation is seeded too
    other_epoch = _epoch_batches(data, 2, 0, 2)
    assert [b["row_id"].tolist() for b in first] != [b["row_id"].tolist() for b in other_epoch]


def test_decode_tasks_pack_consecutive_groups_up_to_the_row_count_without_splitting_one():
    groups = [(RowGroup(f"s{i // 3}.parquet", i % 3, rows), 100 + i) for i, rows in enumerate([5, 7, 12, 1, 30, 4, 4])]
    tasks = decode_tasks(groups, rows_per_task=12)
    # 5+7 | 12 | 1+30 | 4+4 (the last task takes what is left)
    assert [t["seed"] for t in tasks] == [[100, 101], [102], [103, 104], [105, 106]]
    assert tasks[2] == {"path": ["s1.parquet", "s1.parquet"], "row_group": [0, 1], "seed": [103, 104]}
    assert [t["seed"] for t in decode_tasks(groups, rows_per_task=1)] == [[100 + i] for i in range(7)]
    with pytest.raises(ValueError, match="rows_per_task"):
        decode_tasks(groups, rows_per_task=0)


def test_batches_do_not_depend_on_how_row_groups_are_packed_into_tasks(data):
    """12-row groups one per task, three per task, all in one: the same batches, the same pixels
    (a window of P identities, so a block of several identities would change which are drawn)."""
    one = _epoch_batches(data, 1, 0, 1, window=4)
    for rows_per_task in (25, 10_000):
        packed = _epoch_batches(data, 1, 0, 1, rows_per_task=rows_per_task, window=4)
        assert [b["row_id"].tolist() for b in packed] == [b["row_id"].tolist() for b in one]
        for x, y in zip(packed, one):
            np.testing.assert_array_equal(x["image"], y["image"])


def test_blocks_held_in_the_object_store_survive_the_workers_reusing_their_decode_buffer(data):
    """Each decode process reuses one output buffer task after task: every block of an epoch,
    all held at once, must still be what a fresh decode of its task gives."""
    from reidscale.data.pipeline import _mix, read_decode_row_groups

    groups = row_groups(data, "train")
    held = list(worker_stream(groups, CFG, epochs=range(2, 3), seed=5, rank=0, world=1))
    mine = epoch_assignment(groups, 2, 5, 0, 1)
    tasks = decode_tasks([(g, _mix(5, 2, index) % (2**63)) for index, g in mine], 1)
    assert len(held) == len(tasks) > 4  # more tasks than the 2 worker processes: buffers were reused
    for block, task in zip(held, tasks):
        fresh = read_decode_row_groups({k: np.array([v], dtype=object) for k, v in task.items()}, CFG, True)
        assert block["row_id"].tolist() == fresh["row_id"].tolist()
        np.testing.assert_array_equal(block["image"], fresh["image"])


def test_a_reused_decode_buffer_is_overwritten_by_the_next_call(data):
    """The contract that keeps reuse_output to Ray tasks: an in-process caller keeping two
    results would see the second's pixels in the first."""
    from reidscale.data.pipeline import read_decode_row_groups

    a, b = ({k: np.array([v], dtype=object) for k, v in t.items()}
            for t in decode_tasks([(g, 0) for g in row_groups(data, "train")[:2]], 1))
    first = read_decode_row_groups(a, CFG, True, reuse_output=True)
    kept = first["image"].copy()
    second = read_decode_row_groups(b, CFG, True, reuse_output=True)
    assert np.shares_memory(first["image"], second["image"])
    assert not np.array_equal(first["image"], kept)
    np.testing.assert_array_equal(second["image"], read_decode_row_groups(b, CFG, True)["image"])


def test_a_stream_over_several_epochs_gives_each_epochs_own_batches(data):
    """Training reads its epochs through worker_epochs (one stream of several epochs, split by
    epoch): each epoch's batches must be those of a stream of that epoch alone, from any first
    epoch (a resume), however many tasks run ahead of the consumer."""
    groups = row_groups(data, "train")
    for first, in_flight in ((0, None), (2, 1), (1, 50)):  # the cluster's default; none ahead; more than an epoch
        blocks = worker_epochs(groups, CFG, epochs=range(first, 5), seed=3, rank=1, world=2, in_flight=in_flight)
        stream = PKStream(4, 2, seed=3 * 1_000_003 + 1)
        for epoch in range(first, 5):
            got = list(stream.epoch(blocks.epoch(epoch), epoch))
            alone = _epoch_batches(data, epoch, 1, 2, seed=3)
            assert got and [b["row_id"].tolist() for b in got] == [b["row_id"].tolist() for b in alone]
            for x, y in zip(got, alone):
                np.testing.assert_array_equal(x["image"], y["image"])
        assert list(blocks.epoch(5)) == []
    # a run resumed after its last epoch, or a stage of 0 epochs: nothing to read
    nothing = worker_epochs(groups, CFG, epochs=range(5, 5), seed=3, rank=1, world=2)
    assert list(nothing.epoch(5)) == []
    # a worker with no row groups is refused when its stream is made, before any task runs
    with pytest.raises(ValueError, match="worker 2 of 3 has no row groups"):
        worker_epochs(groups[:2], CFG, epochs=range(0, 1), seed=3, rank=2, world=3)


def test_ordered_stream_keeps_the_order_and_at_most_in_flight_submitted_ahead():
    submitted, fetched, most_ahead = [], [], []

    def submit(item):
        submitted.append(item)
        most_ahead.append(len(submitted) - len(fetched))
        return ("ref", item)

    def fetch(ref):
        fetched.append(ref[1])
        return ref[1] * 10

    for in_flight in (1, 3, 100):
        submitted.clear(), fetched.clear(), most_ahead.clear()
        prefetched = []
        stream = ordered_stream(range(7), submit, fetch, in_flight,
                                prefetch=lambda pending: prefetched.append([item for _, item in pending]))
        assert submitted == []  # lazy: nothing runs before the first block is asked for
        first = next(stream)
        assert first == 0 and len(submitted) == min(in_flight, 7)  # the decode ahead of the consumer
        assert [first, *stream] == [i * 10 for i in range(7)]
        assert fetched == list(range(7)) and max(most_ahead) == min(in_flight, 7)
        # after every submit, prefetch sees exactly what is submitted and not yet fetched
        assert len(prefetched) == 7
        assert prefetched == [list(range(max(0, i + 1 - in_flight), i + 1)) for i in range(7)]
    with pytest.raises(ValueError, match="in_flight"):
        next(ordered_stream(range(3), submit, fetch, 0))


def test_tasks_in_flight_follow_the_cpus_and_stay_within_a_quarter_of_the_object_store():
    block = 50 * 2**20
    # twice the tasks a worker's share of the CPUs runs at once: 2 CPUs, 1 worker → 4
    assert tasks_in_flight(2, 8 * 2**30, 1, block) == 4
    assert tasks_in_flight(64, 100 * 2**30, 8, block) == 16  # 8 CPUs a worker
    assert tasks_in_flight(64, 100 * 2**30, 8, block, cpus_per_task=2.0) == 8
    # 1 GiB of store, a quarter of it for 1 worker's 50 MiB blocks: 5, fewer than the 8 the CPUs want
    assert tasks_in_flight(4, 2**30, 1, block) == 5
    assert tasks_in_flight(64, 2**30, 8, block) == 2  # never fewer than one decoding and one ready
    assert tasks_in_flight(0.5, 8 * 2**30, 4, block) == 2


def test_epoch_blocks_skip_what_an_epoch_left_unread_and_hold_the_next_epochs_first_block():
    blocks = [{"epoch": np.array([e] * n), "n": i} for i, (e, n) in enumerate([(0, 2), (0, 0), (0, 1), (1, 3), (3, 1)])]
    split = EpochBlocks(iter(blocks))
    first = split.epoch(0)
    assert next(first)["n"] == 0  # the rest of epoch 0 left unread
    assert [b["n"] for b in split.epoch(1)] == [3]
    assert [b["n"] for b in split.epoch(2)] == []  # an epoch with no block of its own: nothing
    assert [b["n"] for b in split.epoch(3)] == [4]


def test_an_epoch_over_all_workers_visits_every_training_row(data):
    from reidscale.data.shards import read_metadata

    seen = set()
    for rank in range(2):
        for batch in _epoch_batches(data, 0, rank, 2):
            assert len(set(batch["identity"].tolist())) == 4
            seen |= set(batch["row_id"].tolist())
    assert seen == set(read_metadata(data, "train").column("row_id").to_pylist())


def test_batches_carry_cameras_and_normalised_images_equal_to_the_float_path(data):
    """Decode tasks ship uint8; the consumer's normalisation must give the float32 path's values."""
    import pyarrow.parquet as pq

    from reidscale.data.shards import split_files

    tables = [pq.read_table(str(f), columns=["row_id", "camera", "image"]) for f in split_files(data, "train")]
    by_row = {}
    for t in tables:
        for row_id, camera, image in zip(t.column("row_id").to_pylist(), t.column("camera").to_pylist(),
                                         t.column("image").to_pylist()):
            by_row[row_id] = (camera, image)
    blocks = worker_epochs(row_groups(data, "train"), CFG, epochs=range(0, 1), seed=0, rank=0, world=1, train=False)
    batches = list(PKStream(4, 2, seed=0).epoch(blocks.epoch(0), 0))
    # uint8 all the way to the training step, which normalises on its device
    assert batches and all(b["image"].dtype == np.uint8 for b in batches)
    for batch in batches[:3]:
        assert batch["camera"].tolist() == [by_row[r][0] for r in batch["row_id"].tolist()]
        expected = decode_batch({"image": np.array([by_row[r][1] for r in batch["row_id"].tolist()], dtype=object)},
                                CFG, train=False)["image"]
        np.testing.assert_allclose(model_input(batch["image"], CFG).numpy(), expected, rtol=0, atol=1e-6)


def test_uint8_images_without_a_transform_are_refused():
    with pytest.raises(ValueError, match="mean and std"):
        model_input(np.zeros((2, 3, 4, 2), np.uint8), None)


def test_model_input_normalises_exactly_as_the_numpy_reference():
    from reidscale.data.transforms import normalise_batch

    images = np.random.default_rng(0).integers(0, 256, (5, 3, 8, 4), dtype=np.uint8)
    np.testing.assert_array_equal(model_input(images, CFG).numpy(), normalise_batch(images, CFG))
    # the accelerator's path (torch ops on the device), run here on the CPU
    np.testing.assert_array_equal(normalise_on_device(images, CFG, "cpu").numpy(), normalise_batch(images, CFG))
    floats = normalise_batch(images, CFG)
    assert model_input(floats, None).dtype == torch.float32  # already normalised: moved as it is
    assert model_input(images, CFG, dtype=torch.bfloat16).dtype == torch.bfloat16
