"""Pre-flight checks of train.p / train.k / num_workers against a dataset, without Ray."""

from collections import Counter

import pyarrow.parquet as pq
import pytest

from reidscale.data.preflight import check_pk, check_row_groups
from reidscale.data.shards import write_dataset


def _write(root, images_per_identity, rows_per_group=64):
    records = [{"image": b"x", "identity": i, "label": i, "camera": j % 2, "split": "train",
                "path": f"{i}/{j}.jpg", "width": 1, "height": 1}
               for i, n in enumerate(images_per_identity) for j in range(n)]
    write_dataset(iter(records), root, source="test", rows_per_group=rows_per_group)
    return Counter(r["identity"] for r in records)


def test_k_above_every_identitys_count_warns_naming_the_counts(tmp_path):
    counts = _write(tmp_path, [2, 3, 5, 4, 3, 2])
    largest = max(counts.values())  # 5, computed here from the records
    (warning,) = check_pk(tmp_path, p=4, k=largest + 1)
    assert f"train.k={largest + 1}" in warning and f"largest {largest}" in warning and "median 3" in warning
    assert "6 identities" in warning and "with replacement" in warning and "\n" not in warning
    (most,) = check_pk(tmp_path, p=4, k=largest)  # one identity has enough: the majority warning instead
    assert "5 of 6 train identities" in most
    assert check_pk(tmp_path, p=4, k=3) == []  # 2 of 6 short: torchreid-style silence


def test_k_above_most_identities_counts_warns_with_the_share(tmp_path):
    _write(tmp_path, [2, 2, 2, 2, 9, 9])
    (warning,) = check_pk(tmp_path, p=2, k=4)
    assert "4 of 6 train identities (67%) have fewer than 4 images" in warning
    assert check_pk(tmp_path, p=2, k=2) == []


def test_impossible_p_or_k_is_refused_naming_the_key(tmp_path):
    _write(tmp_path, [4] * 5)
    with pytest.raises(ValueError, match=r"train.p=6 exceeds the 5 train identities .*train.p<=5"):
        check_pk(tmp_path, p=6, k=4)
    with pytest.raises(ValueError, match="train.p >= 2 and train.k >= 1"):
        check_pk(tmp_path, p=1, k=4)
    with pytest.raises(ValueError, match="train.p >= 2 and train.k >= 1"):
        check_pk(tmp_path, p=2, k=0)


def test_workers_that_cannot_get_p_identities_are_refused_or_warned(tmp_path):
    # rows_per_group=4 with 4 images each: one identity per row group, 6 row groups
    _write(tmp_path / "even", [4] * 6, rows_per_group=4)
    with pytest.raises(ValueError, match=r"train.p=4: with train.num_workers=2 no worker can get 4 identities"):
        check_pk(tmp_path / "even", p=4, k=2, num_workers=2)  # 3 row groups = 3 identities per worker
    assert check_pk(tmp_path / "even", p=3, k=2, num_workers=2) == []
    # uneven groups: [1 id][1 id][4 ids][4 ids] (rows_per_group=8, identities of 8 then 2 images)
    _write(tmp_path / "uneven", [8, 8, 2, 2, 2, 2, 2, 2, 2, 2], rows_per_group=8)
    per_group = [pq.ParquetFile(f).metadata.num_row_groups for f in sorted((tmp_path / "uneven").glob("*.parquet"))]
    assert sum(per_group) == 4
    (warning,) = check_pk(tmp_path / "uneven", p=3, k=2, num_workers=2)
    assert "may get as few as 2 identities" in warning


def test_fewer_row_groups_than_workers_is_refused_before_ray(tmp_path):
    _write(tmp_path, [4] * 6, rows_per_group=8)  # two identities per row group: 3 groups
    groups = sum(pq.ParquetFile(f).metadata.num_row_groups for f in tmp_path.glob("train-*.parquet"))
    assert check_row_groups(tmp_path, "train", groups) == groups == 3
    with pytest.raises(ValueError, match=r"3 row group\(s\) for train.num_workers=4; use train.num_workers<=3"):
        check_row_groups(tmp_path, "train", 4)


def test_the_training_job_refuses_an_impossible_p_before_ray_or_mlflow_start(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    _write(tmp_path / "data", [4] * 5)
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(repo / "jobs" / "train_clipreid.py"), f"run_dir={run_dir}",
                           f"data_dir={tmp_path / 'data'}", "train.p=6", "train.k=2", "train.num_workers=1", "train.eval_every_epochs=0"],
                          cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "train.p=6 exceeds the 5 train identities" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "mlflow.db").exists()
