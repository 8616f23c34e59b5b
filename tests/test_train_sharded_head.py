"""model.shard_classifier=true through the training job: each of 2 workers holds half the ID
table (and, with recipe=clipreid, the prompts of half the identities) outside DeepSpeed,
checkpoints hold one logical table each, and a resumed run reads the head back and skips stage 1.
The head's arithmetic (exact softmax, gradient scale through DeepSpeed, re-sharding on
load) is tested against a replicated reference in test_sharded_fc.py."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parents[1]
TOY = [
    "transform.height=32", "transform.width=16", "transform.pad=2",
    "model.width=32", "model.layers=1", "model.heads=2", "model.embed_dim=16",
    "model.classifier=partial_fc", "model.shard_classifier=true", "model.sample_rate=0.5",
    "train.p=4", "train.k=2", "train.num_workers=2", "train.cpus_per_worker=0.5",
    "train.log_every=1", "optim.warmup_epochs=0", "optim.lr=0.003",
]


def _job(*args, timeout=600):
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "train_clipreid.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    prep = subprocess.run([sys.executable, str(REPO / "jobs" / "prepare_data.py"), f"out_dir={root / 'data'}",
                           "synthetic.num_identities=25", "synthetic.height=32", "synthetic.width=16",
                           "synthetic.images_per_identity_median=6", "rows_per_group=16"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stderr
    return root / "data"


@pytest.mark.timeout(1200)
def test_sharded_head_and_prompts_train_checkpoint_one_table_each_and_resume_where_they_stopped(tmp_path, data_dir):
    # CLIP-ReID with the sharded head: one pair of jobs covers the ID head's table and the
    # prompts' text-feature table (each job starts 2 workers: the suite's slowest kind of test)
    whole = tmp_path / "whole"
    clipreid = ["recipe=clipreid", "clipreid.stage1_epochs=1", "clipreid.stage1_batch=8"]
    proc = _job(f"run_dir={whole}", f"data_dir={data_dir}", *TOY, *clipreid, "train.epochs=1")
    out = proc.stdout + proc.stderr
    num_classes = json.loads((data_dir / "manifest.json").read_text())["num_classes"]
    mid = num_classes // 2
    assert f"each of 2 workers holds {mid} of {num_classes} identities" in out
    assert f"each of 2 workers trains the prompts of {mid} of {num_classes} identities" in out
    assert "stage 1 epoch 1/1" in out and " i2t " in out  # stage 2 logged its sharded i2t term

    # the checkpoint holds the head's table once, split at the ranks' ranges, each file as listed
    checkpoint = Path(json.loads((whole / "train_summary.json").read_text())["checkpoint"])
    index = json.loads((checkpoint / "sharded_fc" / "sharded_fc.json").read_text())
    assert index["num_classes"] == num_classes and index["saved_by_ranks"] == 2
    assert [(s["lo"], s["hi"]) for s in index["shards"]] == [(0, mid), (mid, num_classes)]
    rows = [load_file(str(checkpoint / "sharded_fc" / s["file"]))["weight"] for s in index["shards"]]
    assert [r.shape for r in rows] == [(mid, 16), (num_classes - mid, 16)]
    assert all(np.isfinite(r).all() for r in rows)
    # ... and no copy of it inside the engine's model: the export and its training model hold no centres
    from reidscale.models.sharded_fc import init_rows

    trained = np.concatenate(rows)
    initial = np.concatenate([init_rows(s["lo"], s["hi"], 16, 0).numpy() for s in index["shards"]])
    assert np.abs(trained - initial).max() > 1e-4  # the head's own optimizer moved the centres

    # the text features: one table of two per-range files, in the run dir and in the checkpoint
    assert not (whole / "clipreid" / "text_features.safetensors").exists()
    tables = []
    for directory in (whole / "clipreid" / "text_features", checkpoint / "text_features"):
        index = json.loads((directory / "text_features.json").read_text())
        assert [(s["lo"], s["hi"]) for s in index["shards"]] == [(0, mid), (mid, num_classes)]
        tables.append(np.concatenate([load_file(str(directory / s["file"]))["text_features"] for s in index["shards"]]))
    assert tables[0].shape == (num_classes, 16) and np.isfinite(tables[0]).all()
    np.testing.assert_array_equal(tables[0], tables[1])

    # a re-run to epoch 2 continues from that checkpoint: head rows and optimizer state read back,
    # stage 1 skipped (the runs are not bitwise reproducible here, so the check is what was read)
    resumed = _job(f"run_dir={whole}", f"data_dir={data_dir}", *TOY, *clipreid, "train.epochs=2")
    out = resumed.stdout + resumed.stderr
    assert f"resuming from {checkpoint}" in out
    assert f"sharded ID head restored: {num_classes} identities from 2 shard file(s)" in out
    assert "stage 1 already done: text features [0, " in out and "stage 1 epoch" not in out
    final = json.loads((whole / "train_summary.json").read_text())["final"]
    assert final["epoch"] == 2 and np.isfinite(final["epoch_loss"])


def test_sharded_head_configs_that_cannot_work_are_refused_before_any_work(tmp_path):
    for bad, message in (
        (["model.shard_classifier=true"], "set classifier=partial_fc"),
        (["model.classifier=partial_fc", "model.shard_classifier=true", "train.zero_stage=3"], "zero_stage 0-2"),
        (["model.classifier=partial_fc", "model.shard_classifier=true", "train.sampler=hard"], "sampler=pk"),
    ):
        proc = subprocess.run([sys.executable, str(REPO / "jobs" / "train_clipreid.py"), f"run_dir={tmp_path}", *bad],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert not any(tmp_path.iterdir())
