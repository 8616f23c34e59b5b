"""reidscale.atomic: a failed write leaves the previous content and no temporary behind."""

import hashlib
import json

import pytest

from reidscale import atomic


def _leftovers(directory, keep):
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


def test_failed_file_write_keeps_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    atomic.write_json(target, {"generation": 1})

    def half_write_then_fail(tmp):
        tmp.write_text('{"generation": 2, "trunc')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic.write_file(target, half_write_then_fail)
    assert json.loads(target.read_text()) == {"generation": 1}
    assert _leftovers(tmp_path, {"state.json"}) == []


def test_write_file_returns_sha256_of_the_published_bytes(tmp_path):
    target = tmp_path / "blob.bin"
    digest = atomic.write_file(target, lambda tmp: tmp.write_bytes(b"abc" * 1000), checksum=True)
    assert digest == hashlib.sha256(b"abc" * 1000).hexdigest()
    assert target.read_bytes() == b"abc" * 1000
    atomic.write_bytes(target, b"new")  # replaces an existing file
    assert target.read_bytes() == b"new"
    assert _leftovers(tmp_path, {"blob.bin"}) == []


def test_atomic_file_context_aborts_on_exception(tmp_path):
    target = tmp_path / "shard.parquet"
    target.write_bytes(b"old")
    with pytest.raises(ValueError):
        with atomic.AtomicFile(target) as pending:
            pending.tmp.write_bytes(b"partial")
            raise ValueError("bad row")
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path, {"shard.parquet"}) == []


def test_failed_directory_build_keeps_previous_directory(tmp_path):
    out = tmp_path / "model"
    atomic.replace_dir(out, lambda d: (d / "config.json").write_text("v1"))

    def fail(d):
        (d / "config.json").write_text("v2-partial")
        raise OSError("interrupted")

    with pytest.raises(OSError, match="interrupted"):
        atomic.replace_dir(out, fail)
    assert (out / "config.json").read_text() == "v1"
    assert _leftovers(tmp_path, {"model"}) == []
    atomic.replace_dir(out, lambda d: (d / "config.json").write_text("v2"))
    assert (out / "config.json").read_text() == "v2"
    assert _leftovers(tmp_path, {"model"}) == []


def test_model_export_is_replaced_whole_and_model_sha_reads_its_weights_hash(tmp_path):
    import torch
    from safetensors.torch import load_file

    from reidscale.data.transforms import TransformConfig
    from reidscale.models.backbone import ModelConfig
    from reidscale.models.exported import model_sha
    from reidscale.models.reid import build_reid_model, export_embedding_model

    tiny, size = ModelConfig(width=32, layers=1, heads=2, patch_size=8, embed_dim=16), TransformConfig(height=32, width=16)
    out = tmp_path / "export"
    shas = []
    for seed in (0, 1):  # the second export replaces the first in place
        torch.manual_seed(seed)
        export_embedding_model(build_reid_model(tiny, size, num_classes=4).embedding, tiny, size, out)
        # independent reference: the hash of the saved tensors in sorted-name order, as in reid.state_hash
        state = load_file(str(out / "model.safetensors"))
        digest = hashlib.sha256()
        for name in sorted(state):
            digest.update(name.encode())
            digest.update(state[name].contiguous().numpy().tobytes())
        shas.append(model_sha(out))
        assert shas[-1] == digest.hexdigest()
    assert shas[0] != shas[1]
    assert _leftovers(tmp_path, {"export"}) == []
    with pytest.raises(FileNotFoundError, match="no config.json"):
        model_sha(tmp_path / "missing")
