import json

import pyarrow.parquet as pq
import pytest

from reidscale.data.shards import ShardError, read_manifest, read_metadata, verify_split, write_dataset
from reidscale.data.sources.synthetic import SyntheticConfig, generate


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    cfg = SyntheticConfig(num_identities=24, height=32, width=16, images_per_identity_median=8, seed=3)
    records = list(generate(cfg))
    manifest = write_dataset(iter(records), root, source="synthetic", rows_per_group=20, groups_per_shard=3)
    return root, records, manifest


def test_manifest_counts_match_the_records(dataset):
    root, records, manifest = dataset
    for split in ("train", "query", "gallery"):
        rows = [r for r in records if r["split"] == split]
        info = manifest["splits"][split]
        assert info["images"] == len(rows)
        assert info["identities"] == len({r["identity"] for r in rows})
        assert info["cameras"] == len({r["camera"] for r in rows})
        assert sum(s["rows"] for s in info["shards"]) == len(rows)
    assert manifest["num_classes"] == manifest["splits"]["train"]["identities"]
    assert read_manifest(root) == json.loads((root / "manifest.json").read_text())


def test_row_groups_hold_whole_identities(dataset):
    root, _, manifest = dataset
    seen = {}
    for shard in manifest["splits"]["train"]["shards"]:
        f = pq.ParquetFile(root / shard["file"])
        for g in range(f.num_row_groups):
            ids = set(f.read_row_group(g, columns=["identity"]).column("identity").to_pylist())
            for identity in ids:
                assert identity not in seen, f"identity {identity} spans row groups"
                seen[identity] = (shard["file"], g)
    assert len(seen) == manifest["splits"]["train"]["identities"]


def test_row_ids_are_dense_and_labels_contiguous(dataset):
    root, _, _ = dataset
    meta = read_metadata(root, "train")
    assert sorted(meta.column("row_id").to_pylist()) == list(range(len(meta)))
    labels = sorted(set(meta.column("label").to_pylist()))
    assert labels == list(range(len(labels)))
    assert set(read_metadata(root, "gallery").column("label").to_pylist()) == {-1}


def test_verify_refuses_a_tampered_shard_naming_the_file(dataset, tmp_path):
    import shutil

    root, _, manifest = dataset
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    verify_split(copy, "train")
    victim = copy / manifest["splits"]["train"]["shards"][0]["file"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=victim.name):
        verify_split(copy, "train")


def test_verify_refuses_a_wrong_schema(dataset, tmp_path):
    import shutil

    import pyarrow as pa

    root, _, manifest = dataset
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    entry = manifest["splits"]["train"]["shards"][0]
    victim = copy / entry["file"]
    table = pq.read_table(victim).drop(["camera"])
    pq.write_table(table, victim)
    with pytest.raises(ShardError, match=f"{victim.name}.*camera"):
        verify_split(copy, "train", checksums=False)
    pq.write_table(pa.table({"x": [1]}), victim)
    with pytest.raises(ShardError, match=victim.name):
        verify_split(copy, "train", checksums=False)


def test_a_directory_without_manifest_is_refused(tmp_path):
    with pytest.raises(ShardError, match="never written"):
        read_manifest(tmp_path)


def _records(n_ids, per_id=3, split="train"):
    for identity in range(n_ids):
        for j in range(per_id):
            yield {"image": b"x", "identity": identity, "label": identity if split == "train" else -1,
                   "camera": j % 2, "split": split, "path": f"{identity}/{j}.jpg", "width": 1, "height": 1}


def test_extra_can_be_computed_after_the_last_record(tmp_path):
    seen = []

    def stream():
        for rec in _records(5):
            seen.append(rec["path"])
            yield rec

    manifest = write_dataset(stream(), tmp_path, source="test", extra=lambda: {"records_seen": len(seen)})
    assert manifest["records_seen"] == 15 == read_manifest(tmp_path)["records_seen"]


def test_an_identity_seen_twice_in_a_split_counts_once(tmp_path):
    records = list(_records(3)) + list(_records(2))  # identities 0, 1 come back after 2
    manifest = write_dataset(iter(records), tmp_path, source="test", rows_per_group=4)
    assert manifest["splits"]["train"]["identities"] == 3
    assert manifest["splits"]["train"]["images"] == 15


def test_a_failing_record_stream_leaves_no_manifest_and_remove_shards_cleans_up(tmp_path):
    from reidscale.data.shards import remove_shards

    def broken():
        yield from _records(40)
        raise RuntimeError("source died")

    (tmp_path / "notes.parquet").write_bytes(b"keep me")
    with pytest.raises(RuntimeError):
        write_dataset(broken(), tmp_path, source="test", rows_per_group=8, groups_per_shard=2)
    assert not (tmp_path / "manifest.json").exists()
    assert any(p.name.startswith("train-") for p in tmp_path.iterdir())
    removed = remove_shards(tmp_path)
    assert removed and sorted(p.name for p in tmp_path.iterdir()) == ["notes.parquet"]


def test_an_unlisted_parquet_file_is_warned_about_once_naming_it(dataset, tmp_path, caplog):
    import logging
    import shutil

    root, _, _ = dataset
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    for name in ("train-00099.parquet", "mine.parquet"):
        pq.write_table(pq.read_table(next(copy.glob("train-*.parquet"))), copy / name)
    (copy / "notes.txt").write_text("not a shard: no warning")
    with caplog.at_level(logging.WARNING, logger="reidscale.data.shards"):
        files = verify_split(copy, "train")
        read_metadata(copy, "train")
        verify_split(copy, "query")
    assert {p.name for p in files}.isdisjoint({"train-00099.parquet", "mine.parquet"})
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2, warned  # one per file, not one per read
    assert any("train-00099.parquet" in m for m in warned) and any("mine.parquet" in m for m in warned)
    assert all("ignored" in m and "\n" not in m for m in warned)


def test_a_clean_dataset_gives_no_warning(dataset, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="reidscale.data.shards"):
        verify_split(dataset[0], "train")
    assert not caplog.records


def test_rewriting_a_directory_removes_the_earlier_writes_shards(tmp_path):
    write_dataset(_records(40), tmp_path, source="test", rows_per_group=8, groups_per_shard=1)
    assert len(list(tmp_path.glob("train-*.parquet"))) > 2
    write_dataset(_records(4), tmp_path, source="test", rows_per_group=8, groups_per_shard=1)
    listed = {s["file"] for s in read_manifest(tmp_path)["splits"]["train"]["shards"]}
    assert {p.name for p in tmp_path.glob("*.parquet")} == listed


def test_a_missing_split_is_one_line_naming_the_directory_its_splits_and_the_command(tmp_path):
    write_dataset(_records(4), tmp_path, source="folder")
    for read in (lambda: verify_split(tmp_path, "query"), lambda: read_metadata(tmp_path, "query"),
                 lambda: read_manifest(tmp_path)["splits"]["query"]):  # how embed/evaluate index it
        with pytest.raises(ShardError) as err:
            read()
        message = str(err.value)
        assert str(tmp_path) in message and "no 'query' split" in message and "it has: train" in message
        assert "python jobs/prepare_data.py source=folder" in message and "\n" not in message
    assert read_manifest(tmp_path)["splits"].get("query") is None  # .get stays a plain lookup
