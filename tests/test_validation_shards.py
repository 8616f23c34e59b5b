"""In-training validation reads the query/gallery shards only after checking them against the manifest."""

import shutil

import pytest
import torch

from reidscale.data.shards import ShardError, read_manifest, write_dataset
from reidscale.data.sources.synthetic import SyntheticConfig, generate
from reidscale.data.transforms import TransformConfig
from reidscale.train.validation import embed_split_distributed


@pytest.mark.parametrize("split", ["query", "gallery"])
def test_a_flipped_byte_in_a_validation_shard_is_refused_naming_the_file(tmp_path, split):
    cfg = SyntheticConfig(num_identities=12, height=32, width=16, images_per_identity_median=6, seed=1)
    write_dataset(generate(cfg), tmp_path / "data", source="synthetic")
    victim = tmp_path / "data" / read_manifest(tmp_path / "data")["splits"][split]["shards"][0]["file"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    # no model is needed: the shard must be refused before anything is read from it
    with pytest.raises(ShardError, match=f"{victim.name}: sha256 does not match") as err:
        embed_split_distributed(None, str(tmp_path / "data"), split, TransformConfig(height=32, width=16),
                                rank=0, world=1, device="cpu", dtype=torch.float32)
    assert str(victim) in str(err.value) and "\n" not in str(err.value)
