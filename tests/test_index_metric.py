"""reidscale.index.metric: the one map between gallery metrics, FAISS constants and evaluation distances."""

import faiss
import numpy as np
import pytest

from reidscale.index.metric import eval_metric_for, faiss_metric, gallery_metric_for, larger_is_closer


def test_faiss_metric_constants_and_score_direction_match_a_real_faiss_search():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:5]
    for metric, constant in (("ip", faiss.METRIC_INNER_PRODUCT), ("l2", faiss.METRIC_L2)):
        assert faiss_metric(metric) == constant
        index = faiss.index_factory(8, "Flat", faiss_metric(metric))
        index.add(x)
        scores, ids = index.search(q, 3)
        # the nearest neighbour of a stored vector is itself; FAISS lists best first
        assert (ids[:, 0] == np.arange(5)).all()
        expected = np.sort(scores, axis=1)[:, ::-1] if larger_is_closer(metric) else np.sort(scores, axis=1)
        np.testing.assert_array_equal(scores, expected)


def test_eval_and_gallery_metric_names_are_inverse_and_unknown_names_are_refused():
    for g in ("ip", "l2"):
        assert gallery_metric_for(eval_metric_for(g)) == g
    assert eval_metric_for("ip") == "cosine" and eval_metric_for("l2") == "euclidean"
    with pytest.raises(ValueError, match="'cos'"):
        faiss_metric("cos")
    with pytest.raises(ValueError, match="'dot'"):
        gallery_metric_for("dot")
