"""k-reciprocal re-ranking: top-k implementation against the authors' dense algorithm written out plainly."""

import tracemalloc

import numpy as np
import pytest

from reidscale.config import ConfigError, parse_job_args
from reidscale.evaluate import evaluate_reid, evaluate_reid_reranked, k_reciprocal_encodings, rerank
from reidscale.evaluate.job import EvalJobConfig, format_summary, ranking_metrics
from reidscale.evaluate.rerank import smallest


def dense_re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
    """Zhong et al.'s re_ranking on full matrices: (Q, G) re-ranked distances.

    Inputs are Euclidean distances; as in the authors' code they are squared, and each row of
    the (Q+G) x (Q+G) matrix is divided by its largest entry. Neighbour lists use a stable
    argsort (ties by index), where the authors' quicksort leaves ties unspecified.
    """
    n_q = len(q_g_dist)
    dist = np.block([[q_q_dist, q_g_dist], [q_g_dist.T, g_g_dist]]).astype(np.float32) ** 2
    dist = (dist / dist.max(axis=0)).T
    n = len(dist)
    rank = np.argsort(dist, axis=1, kind="stable")

    def k_reciprocal(i, k):
        forward = rank[i, : k + 1]
        return forward[(rank[forward, : k + 1] == i).any(axis=1)]

    v = np.zeros((n, n), np.float32)
    for i in range(n):
        r = k_reciprocal(i, k1)
        expansion = list(r)
        for c in r:
            r_half = k_reciprocal(c, int(np.around(k1 / 2)))
            if len(np.intersect1d(r_half, r)) > 2 / 3 * len(r_half):
                expansion.extend(r_half)
        expansion = np.unique(expansion)
        w = np.exp(-dist[i, expansion])
        v[i, expansion] = w / w.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jaccard = np.empty((n_q, n), np.float32)
    for i in range(n_q):
        overlap = np.minimum(v[i], v).sum(axis=1)
        jaccard[i] = 1 - overlap / (2 - overlap)
    return (jaccard * (1 - lambda_value) + dist[:n_q] * lambda_value)[:, n_q:]


def euclidean(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sqrt(np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0))


def dense_inputs(q, g, metric):
    """The reference's three Euclidean distance matrices for our metric (cosine: of unit vectors)."""
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
    return euclidean(q, g), euclidean(q, q), euclidean(g, g)


def evaluate_dense(dist, q_ids, g_ids, q_cams, g_cams, max_rank):
    """Market-1501 protocol on a full (Q, G) matrix: stable argsort per row, same id + camera removed."""
    first, aps, inps = [], [], []
    for i in range(len(dist)):
        order = np.argsort(dist[i], kind="stable")
        keep = ~((g_ids[order] == q_ids[i]) & (g_cams[order] == q_cams[i]))
        match = g_ids[order][keep] == q_ids[i]
        if not match.any():
            continue
        ranks = np.flatnonzero(match)
        aps.append(np.mean((np.arange(len(ranks)) + 1) / (ranks + 1.0)))
        inps.append(len(ranks) / (ranks[-1] + 1.0))
        first.append(ranks[0])
    cmc = np.array([np.mean(np.array(first) <= k) for k in range(max_rank)])
    return {"cmc": cmc, "mAP": np.mean(aps), "mINP": np.mean(inps), "num_valid_queries": len(aps)}


def make_data(rng, n_q=40, n_g=260, dim=16, n_ids=30, n_cams=4, noise=0.8, cam_noise=0.0):
    """Identity centres + camera offsets + noise; queries include ids with no gallery image."""
    centres = rng.standard_normal((n_ids + 3, dim))
    cam_offsets = cam_noise * rng.standard_normal((n_cams, dim))
    g_ids, q_ids = rng.integers(0, n_ids, n_g), rng.integers(0, n_ids + 3, n_q)
    g_cams, q_cams = rng.integers(0, n_cams, n_g), rng.integers(0, n_cams, n_q)
    g = centres[g_ids] + cam_offsets[g_cams] + noise * rng.standard_normal((n_g, dim))
    q = centres[q_ids] + cam_offsets[q_cams] + noise * rng.standard_normal((n_q, dim))
    return q.astype(np.float32), g.astype(np.float32), q_ids, g_ids, q_cams, g_cams


def assert_same_metrics(ours, ref):
    assert ours["num_valid_queries"] == ref["num_valid_queries"]
    np.testing.assert_allclose(ours["cmc"], ref["cmc"], rtol=0, atol=1e-9)
    assert ours["mAP"] == pytest.approx(ref["mAP"], abs=1e-9)
    assert ours["mINP"] == pytest.approx(ref["mINP"], abs=1e-9)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("k1,k2,lam", [(20, 6, 0.3), (7, 3, 0.6), (5, 1, 0.0), (3, 3, 1.0)])
def test_whole_gallery_candidates_equal_the_dense_reference(metric, k1, k2, lam):
    rng = np.random.default_rng([k1, k2, metric == "cosine"])
    q, g, q_ids, g_ids, q_cams, g_cams = make_data(rng)
    ref = dense_re_ranking(*dense_inputs(q, g, metric), k1=k1, k2=k2, lambda_value=lam)

    idx, dist = rerank(q, g, metric=metric, k1=k1, k2=k2, lambda_value=lam, candidates=None, chunk_size=64)
    assert idx.shape == dist.shape == (len(q), len(g))
    full = np.empty_like(dist)
    np.put_along_axis(full, idx, dist, axis=1)
    np.testing.assert_allclose(full, ref, rtol=0, atol=1e-5)
    assert (np.diff(dist, axis=1) >= 0).all()  # best first

    expected = evaluate_dense(ref, q_ids, g_ids, q_cams, g_cams, max_rank=10)
    for chunk_size in (None, 7):
        ours = evaluate_reid_reranked(q, g, q_ids, g_ids, q_cams, g_cams, metric=metric, max_rank=10, k1=k1,
                                      k2=k2, lambda_value=lam, candidates=None, chunk_size=chunk_size)
        assert_same_metrics(ours, expected)
    assert 0 < expected["num_valid_queries"] < len(q)  # skipped queries were exercised


def test_lambda_one_keeps_the_original_ranking():
    rng = np.random.default_rng(5)
    q, g, q_ids, g_ids, q_cams, g_cams = make_data(rng)
    plain = evaluate_reid(q, g, q_ids, g_ids, q_cams, g_cams, max_rank=10)
    assert_same_metrics(evaluate_reid_reranked(q, g, q_ids, g_ids, q_cams, g_cams, max_rank=10, lambda_value=1.0,
                                               candidates=None), plain)


@pytest.mark.parametrize("m", [1, 15, 100])
def test_candidates_are_the_original_top_m_reordered_and_the_rest_keeps_its_order(m):
    rng = np.random.default_rng(m)
    q, g, q_ids, g_ids, q_cams, g_cams = make_data(rng)
    ref = dense_re_ranking(*dense_inputs(q, g, "euclidean"), k1=10, k2=4, lambda_value=0.3).astype(np.float64)
    original = euclidean(q, g)
    top = np.argsort(original, axis=1, kind="stable")[:, :m]

    idx, dist = rerank(q, g, k1=10, k2=4, candidates=m, chunk_size=16)
    assert idx.shape == (len(q), m)
    np.testing.assert_array_equal(np.sort(idx, axis=1), np.sort(top, axis=1))
    np.testing.assert_allclose(dist, np.take_along_axis(ref, idx, 1), rtol=0, atol=1e-5)

    # the order the metrics must score: candidates by re-ranked distance, then the rest by distance
    in_top = np.zeros(original.shape, bool)
    np.put_along_axis(in_top, top, True, axis=1)
    order_key = np.where(in_top, ref, 10.0 + original)
    expected = evaluate_dense(order_key, q_ids, g_ids, q_cams, g_cams, max_rank=20)
    ours = evaluate_reid_reranked(q, g, q_ids, g_ids, q_cams, g_cams, max_rank=20, k1=10, k2=4, candidates=m,
                                  chunk_size=9)
    assert_same_metrics(ours, expected)


def test_reranking_improves_map_on_clustered_features_with_camera_noise():
    rng = np.random.default_rng(0)
    q, g, q_ids, g_ids, q_cams, g_cams = make_data(rng, n_q=150, n_g=1200, dim=32, n_ids=100, n_cams=6,
                                                   noise=0.8, cam_noise=0.5)
    plain = evaluate_reid(q, g, q_ids, g_ids, q_cams, g_cams, metric="cosine")
    reranked = evaluate_reid_reranked(q, g, q_ids, g_ids, q_cams, g_cams, metric="cosine")
    # several images per identity and camera: their k-reciprocal sets overlap where distances alone are noisy
    assert reranked["mAP"] > plain["mAP"] + 0.1, (plain["mAP"], reranked["mAP"])  # 0.66 -> 0.87 when written


def test_encodings_are_sparse_rows_that_sum_to_one():
    rng = np.random.default_rng(1)
    q, g, *_ = make_data(rng, n_q=50, n_g=600)
    before = k_reciprocal_encodings(q, g, k1=10, k2=1).v  # no query expansion
    after = k_reciprocal_encodings(q, g, k1=10, k2=4).v
    for v in (before, after):
        np.testing.assert_allclose(np.bincount(v.row_of_entry(), weights=v.data), 1.0, atol=1e-5)
    # k1-reciprocal sets and their accepted half-size sets: about 1.5 k1 items, k2 rows of them after
    assert np.diff(before.indptr).max() <= 2 * 10
    assert np.diff(after.indptr).max() <= 4 * 2 * 10
    assert len(after.data) < 0.1 * 650**2


def test_memory_stays_far_below_the_dense_matrix():
    rng = np.random.default_rng(2)
    q, g, q_ids, g_ids, q_cams, g_cams = make_data(rng, n_q=300, n_g=6000, dim=32, n_ids=500)
    dense_bytes = 4 * (len(q) + len(g)) ** 2  # one float32 (Q+G)^2 matrix; the authors' code holds several
    tracemalloc.start()
    try:
        result = evaluate_reid_reranked(q, g, q_ids, g_ids, q_cams, g_cams, k1=10, k2=3, candidates=50,
                                        chunk_size=128)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < dense_bytes / 8, f"peak {peak / 2**20:.1f} MiB vs dense {dense_bytes / 2**20:.1f} MiB"
    assert result["num_valid_queries"] > 0


@pytest.mark.parametrize("kwargs,name", [
    ({"k1": 0}, "k1"), ({"k1": 2.5}, "k1"), ({"k1": 5, "k2": 6}, "k2"), ({"k2": 0}, "k2"),
    ({"lambda_value": 1.5}, "lambda_value"), ({"lambda_value": -0.1}, "lambda_value"),
    ({"candidates": 0}, "candidates"), ({"k1": 500}, "k1"), ({"metric": "hamming"}, "metric"),
])
def test_bad_parameters_raise_value_error_naming_the_parameter(kwargs, name):
    rng = np.random.default_rng(3)
    q, g, q_ids, g_ids, q_cams, g_cams = make_data(rng, n_q=20, n_g=100)
    with pytest.raises(ValueError, match=name):
        rerank(q, g, **kwargs)
    with pytest.raises(ValueError, match=name):
        evaluate_reid_reranked(q, g, q_ids, g_ids, q_cams, g_cams, **kwargs)


def test_bad_inputs_raise_value_error():
    rng = np.random.default_rng(4)
    q, g, q_ids, g_ids, q_cams, g_cams = make_data(rng, n_q=20, n_g=100)
    with pytest.raises(ValueError, match="features"):
        rerank(q, g[:, :5])
    with pytest.raises(ValueError, match="query_ids"):
        evaluate_reid_reranked(q, g, q_ids[:5], g_ids, q_cams, g_cams)
    with pytest.raises(ValueError, match="camera"):
        evaluate_reid_reranked(q, g, q_ids, g_ids, q_cams[:3], g_cams)
    bad = q.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        rerank(bad, g)


def test_smallest_is_a_prefix_of_the_stable_argsort_ties_by_index():
    rng = np.random.default_rng(6)
    d = rng.integers(0, 4, (30, 50)).astype(np.float32)  # many exact ties
    for k in (1, 7, 50):
        np.testing.assert_array_equal(smallest(d, k), np.argsort(d, axis=1, kind="stable")[:, :k])


@pytest.mark.parametrize("arg,key", [("rerank_k1=0", "rerank_k1"), ("rerank_k2=21", "rerank_k2"),
                                     ("rerank_lambda=1.5", "rerank_lambda"),
                                     ("rerank_candidates=-1", "rerank_candidates")])
def test_job_config_refuses_bad_rerank_values_naming_the_key(arg, key):
    with pytest.raises(ConfigError, match=key):
        parse_job_args(EvalJobConfig, ["rerank=true", arg])
    cfg = parse_job_args(EvalJobConfig, ["rerank=true", "rerank_k1=8", "rerank_k2=8", "rerank_candidates=0"])
    assert cfg.rerank and cfg.rerank_k2 == 8 and cfg.rerank_candidates == 0


def test_job_metrics_carry_plain_and_rerank_keys_and_the_table_shows_both():
    rng = np.random.default_rng(7)
    data = make_data(rng, n_q=60, n_g=400, n_ids=40, noise=0.8, cam_noise=0.5)
    plain, _ = ranking_metrics(*data, EvalJobConfig(metric="euclidean", max_rank=10))
    assert not any(k.startswith("rerank") for k in plain)
    cfg = EvalJobConfig(metric="euclidean", max_rank=10, rerank=True, rerank_k1=10, rerank_k2=3,
                        rerank_lambda=0.2, rerank_candidates=0)
    both, curves = ranking_metrics(*data, cfg)
    expected = evaluate_reid_reranked(*data, metric="euclidean", max_rank=10, k1=10, k2=3, lambda_value=0.2,
                                      candidates=None)
    assert {k: both[k] for k in plain} == plain
    assert both["rerank_mAP"] == expected["mAP"] and both["rerank_mINP"] == expected["mINP"]
    assert both["rerank_rank1"] == expected["cmc"][0] and both["rerank_rank10"] == expected["cmc"][9]
    np.testing.assert_array_equal(curves["rerank_cmc"], expected["cmc"])
    assert both["rerank_mAP"] != both["mAP"]

    table = format_summary({"trained": both, "untrained": plain}).splitlines()
    assert [line.split()[0] for line in table[:4]] == ["model", "trained", "trained", "untrained"]
    assert table[2].startswith("trained +rerank") and f"{both['rerank_mAP']:.4f}" in table[2]
    assert f"{both['mAP']:.4f}" in table[1]
