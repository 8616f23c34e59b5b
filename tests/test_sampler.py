from collections import Counter

import numpy as np
import pytest

from reidscale.data.sampler import PKBatcher


def _stream(counts, seed=0):
    """(identity, row) pairs clustered by identity, with row = (identity, index)."""
    rows = []
    for identity, n in counts.items():
        rows.extend((identity, (identity, j)) for j in range(n))
    return rows


@pytest.mark.parametrize("p,k", [(4, 4), (8, 2), (3, 5)])
def test_pk_batch_has_p_identities_times_k_images(p, k):
    rng = np.random.default_rng(0)
    counts = {i: int(rng.integers(1, 15)) for i in range(60)}
    batches = list(PKBatcher(p, k, seed=1).batches(_stream(counts)))
    assert batches
    for batch in batches:
        assert len(batch) == p * k
        per_id = Counter(identity for identity, _ in batch)
        assert len(per_id) == p
        assert set(per_id.values()) == {k}
        # every row belongs to the identity it is filed under
        assert all(row[0] == identity for identity, row in batch)


def test_epoch_emits_every_row_at_least_once():
    rng = np.random.default_rng(1)
    counts = {i: int(rng.integers(1, 12)) for i in range(37)}
    stream = _stream(counts)
    emitted = {row for batch in PKBatcher(4, 4, seed=0).batches(stream) for _, row in batch}
    assert emitted == {row for _, row in stream}


def test_small_identities_are_filled_with_replacement_not_dropped():
    counts = {0: 1, 1: 2, 2: 9, 3: 4, 4: 1}
    batches = list(PKBatcher(2, 4, seed=0).batches(_stream(counts)))
    ids = {identity for batch in batches for identity, _ in batch}
    assert ids == set(counts)


def test_memory_is_bounded_by_the_window():
    batcher = PKBatcher(4, 4, window_identities=16, seed=0)
    peak = 0
    for identity, row in _stream({i: 6 for i in range(2000)}):
        batcher.add(identity, row)
        for _ in batcher.ready():
            pass
        peak = max(peak, len(batcher._open))
    assert peak <= 16
    assert len(batcher._reservoir) <= 8


def test_same_seed_same_batches_and_other_seed_differs():
    stream = _stream({i: 7 for i in range(30)})
    a = list(PKBatcher(4, 4, seed=5).batches(stream))
    b = list(PKBatcher(4, 4, seed=5).batches(stream))
    c = list(PKBatcher(4, 4, seed=6).batches(stream))
    assert a == b
    assert a != c


def test_fewer_identities_than_p_gives_no_batch():
    assert list(PKBatcher(8, 2, seed=0).batches(_stream({1: 10, 2: 10}))) == []


def test_bad_p_or_k_is_refused():
    with pytest.raises(ValueError, match="p >= 2"):
        PKBatcher(1, 4)


def test_extra_batches_repeat_seen_rows_in_pk_shape():
    batcher = PKBatcher(3, 4, seed=0)
    stream = _stream({i: 5 for i in range(10)})
    seen = {row for batch in batcher.batches(stream) for _, row in batch}
    for _ in range(3):
        extra = batcher.extra()
        per_id = Counter(identity for identity, _ in extra)
        assert len(per_id) == 3 and set(per_id.values()) == {4}
        assert {row for _, row in extra} <= seen


def test_extra_batch_without_enough_identities_is_a_clear_error():
    batcher = PKBatcher(2, 2, seed=0)
    with pytest.raises(ValueError, match="only 0 identities"):
        batcher.extra()


def test_hard_negative_mode_groups_the_most_similar_identities():
    # identities on a line: similarity = -|a - b|, so a batch is the anchor and its P-1 neighbours
    def similarity(anchor, identities):
        return -np.abs(np.asarray(identities) - anchor)

    batcher = PKBatcher(4, 2, window_identities=40, seed=3, similarity=similarity)
    batches = list(batcher.batches(_stream({i: 2 for i in range(0, 400, 5)})))
    spreads = [max(i for i, _ in b) - min(i for i, _ in b) for b in batches[:10]]
    # uniform choice over a 40-identity window would spread ~150 apart; neighbours stay within ~5 steps
    assert max(spreads) <= 6 * 5
    uniform = list(PKBatcher(4, 2, window_identities=40, seed=3).batches(_stream({i: 2 for i in range(0, 400, 5)})))
    assert np.mean([max(i for i, _ in b) - min(i for i, _ in b) for b in uniform[:10]]) > 50


def test_random_baseline_emits_every_row_once_in_full_batches():
    from reidscale.data.sampler import RandomBatcher

    stream = _stream({i: 3 for i in range(50)})
    batcher = RandomBatcher(16, seed=0)
    out = []
    for identity, row in stream:
        batcher.add(identity, row)
        out.extend(batcher.ready())
    out.extend(batcher.flush())
    assert all(len(b) == 16 for b in out)
    rows = [row for b in out for _, row in b]
    assert set(rows) == {row for _, row in stream}
    assert len(rows) - len(set(rows)) < 16  # only the last batch repeats rows
