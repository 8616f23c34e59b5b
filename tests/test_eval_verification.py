import numpy as np
import pytest

from reidscale.evaluate import (
    equal_error_rate,
    roc_curve,
    roc_from_features,
    tar_at_far,
    threshold_at_far,
    verification_metrics,
)


def random_pairs(rng, n_gen=300, n_imp=5000, decimals=None):
    genuine = rng.normal(0.6, 0.25, n_gen)
    impostor = rng.normal(1.4, 0.3, n_imp)
    if decimals is not None:  # many exact ties, within and across the two sets
        genuine, impostor = genuine.round(decimals), impostor.round(decimals)
    return genuine, impostor


def sklearn_roc(genuine, impostor):
    metrics = pytest.importorskip("sklearn.metrics")
    labels = np.r_[np.ones(len(genuine)), np.zeros(len(impostor))]
    fpr, tpr, thr = metrics.roc_curve(labels, -np.r_[genuine, impostor], drop_intermediate=False)
    return fpr, tpr, -thr  # scores were negated distances


@pytest.mark.parametrize("decimals", [None, 1])
def test_roc_curve_equals_sklearn(decimals):
    genuine, impostor = random_pairs(np.random.default_rng(0), decimals=decimals)
    roc = roc_curve(genuine, impostor)
    fpr, tpr, thr = sklearn_roc(genuine, impostor)
    np.testing.assert_allclose(roc.far, fpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(roc.tar, tpr, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(roc.thresholds, thr)  # both start at -inf
    assert (roc.num_genuine, roc.num_impostor) == (len(genuine), len(impostor))


def test_tar_and_threshold_at_far_pick_best_point_not_above_far():
    genuine, impostor = random_pairs(np.random.default_rng(1), n_imp=20000)
    roc = roc_curve(genuine, impostor)
    fpr, tpr, thr = sklearn_roc(genuine, impostor)
    for far in (1e-2, 1e-3, 1e-4, 0.0, 1.0):
        ok = fpr <= far
        assert tar_at_far(roc, far) == pytest.approx(tpr[ok].max(), abs=1e-12)
        t = threshold_at_far(roc, far)
        assert np.mean(impostor <= t) <= far  # the threshold honours the FAR it was asked for
        assert np.mean(genuine <= t) == pytest.approx(tar_at_far(roc, far), abs=1e-12)
    with pytest.raises(ValueError, match="far"):
        tar_at_far(roc, 1.5)


@pytest.mark.parametrize("decimals", [None, 2])
def test_eer_matches_brentq_on_interpolated_roc(decimals):
    optimize = pytest.importorskip("scipy.optimize")
    genuine, impostor = random_pairs(np.random.default_rng(2), decimals=decimals)
    fpr, tpr, _ = sklearn_roc(genuine, impostor)
    expected = optimize.brentq(lambda x: 1.0 - x - np.interp(x, fpr, tpr), 0.0, 1.0)
    eer, threshold = equal_error_rate(roc_curve(genuine, impostor))
    assert eer == pytest.approx(expected, abs=1e-6)
    # at the threshold FAR has reached FRR
    assert np.mean(impostor <= threshold) >= 1 - np.mean(genuine <= threshold)


def test_perfectly_separated_pairs_have_zero_eer_and_full_tar():
    roc = roc_curve(np.array([0.1, 0.2, 0.3]), np.array([0.5, 0.9]))
    assert equal_error_rate(roc) == (0.0, 0.3)
    assert tar_at_far(roc, 0.0) == 1.0
    m = verification_metrics(roc, fars=(1e-3,))
    assert m["tar@far=0.001"] == 1.0 and m["threshold@far=0.001"] == 0.3 and m["eer"] == 0.0


def test_no_impostors_raises():
    with pytest.raises(ValueError, match="impostor"):
        roc_curve(np.array([0.1]), np.array([]))


def dense_pair_distances(q, g, q_ids, g_ids, q_cams, g_cams, metric):
    """All genuine and impostor distances from the full matrix, with the library's float32 formulas."""
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
    # float64 products and norms rounded once to float32, as the library does (whatever the BLAS
    # kernel, this agrees with any chunking of the same products except where a ~1e-16 error
    # straddles a float32 rounding boundary, which the test data never hits)
    q64, g64 = q.astype(np.float64), g.astype(np.float64)
    if metric == "cosine":
        dist = (1 - q64 @ g64.T).astype(np.float32)
    else:
        dist = (-2 * (q64 @ g64.T) + (g64 * g64).sum(axis=1)[None, :] + (q64 * q64).sum(axis=1)[:, None]).astype(np.float32)
    same = q_ids[:, None] == g_ids[None, :]
    junk = same & (q_cams[:, None] == g_cams[None, :]) if q_cams is not None else np.zeros_like(same)
    return dist[same & ~junk], dist[~same]


def make_features(rng, n_q=50, n_g=300, dim=8, n_ids=30, integer=False):
    centres = rng.standard_normal((n_ids, dim))
    q_ids, g_ids = rng.integers(0, n_ids, n_q), rng.integers(0, n_ids, n_g)
    q = (centres[q_ids] + 0.7 * rng.standard_normal((n_q, dim))).astype(np.float32)
    g = (centres[g_ids] + 0.7 * rng.standard_normal((n_g, dim))).astype(np.float32)
    if integer:  # distances land exactly on grid points
        q, g = np.round(2 * q), np.round(2 * g)
        q[np.abs(q).sum(1) == 0, 0] = 1
        g[np.abs(g).sum(1) == 0, 0] = 1
    return q, g, q_ids, g_ids, rng.integers(0, 3, n_q), rng.integers(0, 3, n_g)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("use_cameras", [True, False])
@pytest.mark.parametrize("integer", [False, True])
def test_roc_from_features_is_exact_at_its_thresholds(metric, use_cameras, integer):
    rng = np.random.default_rng([metric == "cosine", use_cameras, integer])
    q, g, q_ids, g_ids, q_cams, g_cams = make_features(rng, integer=integer)
    if not use_cameras:
        q_cams = g_cams = None
    genuine, impostor = dense_pair_distances(q, g, q_ids, g_ids, q_cams, g_cams, metric)
    for bins, chunk_size in ((256, 7), (1 << 16, None)):
        roc = roc_from_features(q, g, q_ids, g_ids, q_cams, g_cams, metric=metric, bins=bins,
                                chunk_size=chunk_size)
        assert (roc.num_genuine, roc.num_impostor) == (len(genuine), len(impostor))
        assert roc.far[-1] == roc.tar[-1] == 1 and len(roc.thresholds) <= bins + 1
        t = roc.thresholds[1:]
        np.testing.assert_array_equal(roc.far[1:], np.mean(impostor[None, :] <= t[:, None], axis=1))
        np.testing.assert_array_equal(roc.tar[1:], np.mean(genuine[None, :] <= t[:, None], axis=1))
        # it is the exact ROC of the distances rounded up to its thresholds
        up = lambda d: roc.thresholds[np.searchsorted(roc.thresholds, d, side="left")]
        exact = roc_curve(up(genuine), up(impostor))
        np.testing.assert_array_equal(exact.thresholds, roc.thresholds)
        np.testing.assert_array_equal(exact.far, roc.far)
    # fine grid: summary metrics close to the exact ones
    ref = verification_metrics(roc_curve(genuine, impostor))
    got = verification_metrics(roc)
    assert got["eer"] == pytest.approx(ref["eer"], abs=2e-3)
    assert got["tar@far=0.01"] == pytest.approx(ref["tar@far=0.01"], abs=2e-2)


def test_roc_from_features_coarse_grid_puts_everything_above_in_the_last_bin():
    rng = np.random.default_rng(5)
    q, g, q_ids, g_ids, _, _ = make_features(rng)
    roc = roc_from_features(q, g, q_ids, g_ids, metric="cosine", bins=2)  # grid: 1.0, +inf
    genuine, impostor = dense_pair_distances(q, g, q_ids, g_ids, None, None, "cosine")
    np.testing.assert_array_equal(roc.thresholds, [-np.inf, 1.0, np.inf])
    assert roc.far[1] == np.mean(impostor <= 1.0) and roc.tar[1] == np.mean(genuine <= 1.0)
