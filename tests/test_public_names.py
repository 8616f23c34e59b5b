"""Public names that replaced reach-ins into another module's privates (Gallery.live_labels,
Gallery.resolve_model_dir, PKBatcher.rows_of)."""

import numpy as np
import pyarrow as pa
import pytest

from reidscale.data.sampler import PKBatcher
from reidscale.index.build import build_index
from reidscale.index.gallery import Gallery


def test_rows_of_gives_unemitted_rows_then_the_ones_kept_for_top_up():
    batcher = PKBatcher(2, 2, window_identities=2, seed=0)
    for identity in (7, 8):
        for j in range(2):
            batcher.add(identity, (identity, j))
    assert sorted(batcher.rows_of(7)) == [(7, 0), (7, 1)]
    (batch,) = list(batcher.ready())  # both identities emitted whole
    assert sorted(r for i, r in batch if i == 7) == sorted(batcher.rows_of(7)) == [(7, 0), (7, 1)]
    with pytest.raises(KeyError):
        batcher.rows_of(9)


def test_live_labels_leave_out_removed_rows_and_model_dir_is_resolved_from_the_argument(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 4)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    meta = pa.table({"row_id": np.arange(12, dtype=np.int64), "identity": np.arange(12, dtype=np.int64) // 3 + 100,
                     "camera": (np.arange(12) % 2).astype(np.int32), "path": [f"{i}.jpg" for i in range(12)]})
    build_index(x, meta, tmp_path / "idx", factory="Flat", num_shards=2, log=lambda *_: None)
    gallery = Gallery(tmp_path / "idx")
    assert gallery.remove([1, 5]) == 2
    ids, cams = gallery.live_labels()
    keep = ~np.isin(np.arange(12), [1, 5])
    np.testing.assert_array_equal(ids, (np.arange(12) // 3 + 100)[keep])
    np.testing.assert_array_equal(cams, (np.arange(12) % 2)[keep])
    with pytest.raises(FileNotFoundError, match="no model recorded"):
        gallery.resolve_model_dir()
    with pytest.raises(FileNotFoundError, match="embedding model not found"):
        gallery.resolve_model_dir(tmp_path / "nowhere")
