import tracemalloc
import warnings

import numpy as np
import pytest

from reidscale.evaluate import evaluate_reid


def dense_reference(q, g, q_ids, g_ids, q_cams, g_cams, metric, max_rank):
    """torchreid's eval_market1501 written out plainly: full distance matrix, stable argsort per row.

    Distances use the same float32 formulas as the library, so ties are the same ties.
    """
    q, g = q.astype(np.float32), g.astype(np.float32)
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
    assert dist.dtype == np.float32
    if q_cams is None:  # no camera filter: nothing is ever "same identity and same camera"
        q_cams, g_cams = np.zeros(len(q)), np.ones(len(g))
    all_cmc, all_ap, all_inp = [], [], []
    for i in range(len(q)):
        order = np.argsort(dist[i], kind="stable")
        remove = (g_ids[order] == q_ids[i]) & (g_cams[order] == q_cams[i])
        raw_cmc = (g_ids[order] == q_ids[i])[~remove].astype(np.int64)
        if not raw_cmc.any():
            continue
        cmc = raw_cmc.cumsum()
        cmc[cmc > 1] = 1
        cmc = cmc[:max_rank]
        all_cmc.append(np.concatenate([cmc, np.full(max_rank - len(cmc), cmc[-1])]))
        hits = raw_cmc.cumsum()
        all_ap.append((hits / (np.arange(len(raw_cmc)) + 1.0) * raw_cmc).sum() / raw_cmc.sum())
        last = np.flatnonzero(raw_cmc).max()
        all_inp.append(hits[last] / (last + 1.0))
    return {"cmc": np.mean(all_cmc, axis=0), "mAP": np.mean(all_ap), "mINP": np.mean(all_inp),
            "num_valid_queries": len(all_ap)}


def assert_same(ours, ref):
    assert ours["num_valid_queries"] == ref["num_valid_queries"]
    assert ours["cmc"].dtype == np.float64
    np.testing.assert_allclose(ours["cmc"], ref["cmc"], rtol=0, atol=1e-6)
    assert ours["mAP"] == pytest.approx(ref["mAP"], abs=1e-6)
    assert ours["mINP"] == pytest.approx(ref["mINP"], abs=1e-6)


def make_data(rng, n_q=60, n_g=400, dim=8, n_ids=40, n_cams=3, integer=False, spread=1.0):
    """Identity centres + noise; ids 0..n_ids-1 in the gallery, queries also use unseen ids."""
    centres = rng.standard_normal((n_ids + 5, dim)) * 2
    g_ids = rng.integers(0, n_ids, n_g)
    q_ids = rng.integers(0, n_ids + 5, n_q)  # ids >= n_ids have no match at all
    g = centres[g_ids] + spread * rng.standard_normal((n_g, dim))
    q = centres[q_ids] + spread * rng.standard_normal((n_q, dim))
    if integer:  # small integers: many exactly equal distances, and dot products are exact
        g, q = np.round(g).clip(-2, 2), np.round(q).clip(-2, 2)
        g[g.sum(1) == 0, 0] = 1  # no zero vectors, so cosine is defined
        q[np.abs(q).sum(1) == 0, 0] = 1
        g[np.abs(g).sum(1) == 0, 0] = 1
    cams_g, cams_q = rng.integers(0, n_cams, n_g), rng.integers(0, n_cams, n_q)
    return q.astype(np.float32), g.astype(np.float32), q_ids, g_ids, cams_q, cams_g


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("use_cameras", [True, False])
@pytest.mark.parametrize("integer", [False, True])
def test_matches_dense_stable_argsort_reference(metric, use_cameras, integer):
    rng = np.random.default_rng([metric == "cosine", use_cameras, integer])
    q, g, q_ids, g_ids, q_cams, g_cams = make_data(rng, integer=integer)
    if not use_cameras:
        q_cams = g_cams = None
    ref = dense_reference(q, g, q_ids, g_ids, q_cams, g_cams, metric, max_rank=20)
    for chunk_size in (None, 1, 7):
        ours = evaluate_reid(q, g, q_ids, g_ids, q_cams, g_cams, metric=metric, max_rank=20,
                             chunk_size=chunk_size)
        assert_same(ours, ref)
    assert 0 < ref["num_valid_queries"] < len(q)  # the data did exercise skipped queries


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_ties_between_duplicated_gallery_vectors_follow_gallery_index(metric):
    rng = np.random.default_rng(3)
    q, g, q_ids, g_ids, q_cams, g_cams = make_data(rng, n_g=120, spread=0.3)
    # every gallery vector three times, with different identities: only index order breaks ties
    g, g_cams = np.repeat(g, 3, axis=0), np.repeat(g_cams, 3)
    g_ids = np.where(np.arange(len(g)) % 3 == 0, np.repeat(g_ids, 3), rng.integers(0, 40, len(g)))
    ref = dense_reference(q, g, q_ids, g_ids, q_cams, g_cams, metric, max_rank=10)
    assert_same(evaluate_reid(q, g, q_ids, g_ids, q_cams, g_cams, metric=metric, max_rank=10,
                              chunk_size=5), ref)


def test_hand_computed_example_with_same_camera_exclusion():
    # 1-d features, squared distances 1, 4, 9, 16, 25 from the query at 0
    g = np.array([[1.0], [2.0], [3.0], [4.0], [5.0]])
    g_ids, g_cams = np.array([2, 1, 1, 3, 1]), np.array([1, 1, 0, 1, 1])
    q, q_ids, q_cams = np.array([[0.0]]), np.array([1]), np.array([0])
    # index 2 is same id + same camera: removed, so the kept ranking is neg, POS, neg, POS
    r = evaluate_reid(q, g, q_ids, g_ids, q_cams, g_cams, max_rank=4)
    np.testing.assert_array_equal(r["cmc"], [0, 1, 1, 1])
    assert r["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert r["mINP"] == pytest.approx(2 / 4)
    # without cameras index 2 is a true match: neg, POS, POS, neg, POS
    r = evaluate_reid(q, g, q_ids, g_ids, max_rank=4)
    assert r["mAP"] == pytest.approx((1 / 2 + 2 / 3 + 3 / 5) / 3)
    assert r["mINP"] == pytest.approx(3 / 5)


def test_equal_distances_rank_by_gallery_index():
    q, q_ids = np.array([[0.0]]), np.array([1])
    g, g_ids = np.array([[1.0], [-1.0], [1.0]]), np.array([2, 1, 1])  # all at distance 1
    r = evaluate_reid(q, g, q_ids, g_ids, max_rank=3)  # order: neg, POS, POS
    np.testing.assert_array_equal(r["cmc"], [0, 1, 1])
    assert r["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    r = evaluate_reid(q, g[::-1], q_ids, g_ids[::-1], max_rank=3)  # order: POS, POS, neg
    assert r["mAP"] == 1.0 and r["mINP"] == 1.0


def test_ap_counts_true_matches_beyond_max_rank():
    q, q_ids = np.array([[0.0]]), np.array([1])
    g = np.arange(1, 11, dtype=np.float32)[:, None]
    g_ids = np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 1])  # true matches at ranks 0 and 9
    r = evaluate_reid(q, g, q_ids, g_ids, max_rank=3)
    assert r["mAP"] == pytest.approx((1 + 2 / 10) / 2)
    assert r["mINP"] == pytest.approx(2 / 10)


def test_max_rank_above_gallery_size_warns_and_pads_with_last_value():
    rng = np.random.default_rng(1)
    q, g, q_ids, g_ids, q_cams, g_cams = make_data(rng, n_q=10, n_g=12, n_ids=4)
    with pytest.warns(UserWarning, match="exceeds the gallery size"):
        r = evaluate_reid(q, g, q_ids, g_ids, q_cams, g_cams, max_rank=30)
    assert r["cmc"].shape == (30,)
    np.testing.assert_array_equal(r["cmc"][11:], 1.0)
    assert_same(r, dense_reference(q, g, q_ids, g_ids, q_cams, g_cams, "euclidean", 30))


def test_no_valid_query_raises():
    q, g = np.zeros((2, 3)), np.ones((4, 3))
    with pytest.raises(ValueError, match="no query has a true match"):
        evaluate_reid(q, g, np.array([7, 8]), np.array([1, 2, 3, 4]), max_rank=4)
    with pytest.raises(ValueError, match="no query has a true match"):  # only same-camera matches
        evaluate_reid(q, g, np.array([1, 1]), np.array([1, 2, 3, 4]), np.array([0, 0]), np.array([0, 1, 1, 1]),
                      max_rank=4)


def test_bad_arguments_raise():
    q, g, ids = np.zeros((2, 3)), np.ones((4, 3)), np.arange(4)
    with pytest.raises(ValueError, match="metric"):
        evaluate_reid(q, g, ids[:2], ids, metric="manhattan")
    with pytest.raises(ValueError, match="features"):
        evaluate_reid(q, np.ones((4, 5)), ids[:2], ids)
    with pytest.raises(ValueError, match="both"):
        evaluate_reid(q, g, ids[:2], ids, query_cameras=ids[:2])


def test_memory_stays_far_below_the_full_distance_matrix():
    rng = np.random.default_rng(2)
    q, g, q_ids, g_ids, q_cams, g_cams = make_data(rng, n_q=400, n_g=5000, dim=16, n_ids=300, spread=0.3)
    full_matrix_bytes = len(q) * len(g) * 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate_reid(q, g, q_ids, g_ids, q_cams, g_cams, chunk_size=400)  # warm up imports
    tracemalloc.start()
    ours = evaluate_reid(q, g, q_ids, g_ids, q_cams, g_cams, chunk_size=16)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < full_matrix_bytes / 4, (peak, full_matrix_bytes)
    assert_same(ours, dense_reference(q, g, q_ids, g_ids, q_cams, g_cams, "euclidean", 50))


def test_near_duplicates_with_negative_rounded_distances():
    # near-duplicate vectors: float32 rounding makes many squared distances slightly negative
    rng = np.random.default_rng(4)
    base = rng.standard_normal((20, 64)).astype(np.float32)
    g = np.repeat(base, 10, axis=0) + 1e-5 * rng.standard_normal((200, 64)).astype(np.float32)
    g_ids, g_cams = rng.integers(0, 5, 200), rng.integers(0, 2, 200)
    q, q_ids, q_cams = base, rng.integers(0, 5, 20), rng.integers(0, 2, 20)
    dist = -2 * (q @ g.T) + (g * g).sum(axis=1)[None, :] + (q * q).sum(axis=1)[:, None]
    assert (dist < 0).sum() > 50 and (dist == 0).sum() > 10  # and exact ties at zero
    # One chunk: the same matmul call as the reference. Here ranks hinge on the last bit of
    # each distance, and BLAS may round differently for other shapes (tiny ones especially).
    for cams in ((q_cams, g_cams), (None, None)):
        ref = dense_reference(q, g, q_ids, g_ids, *cams, "euclidean", 10)
        assert_same(evaluate_reid(q, g, q_ids, g_ids, *cams, max_rank=10), ref)


# ---- BLAS independence (issue 12 §1): CI runs these under two OpenBLAS core types (Makefile `test`)
from reidscale.evaluate.metrics import distance_chunks, find_duplicates  # noqa: E402


def duplicate_heavy(rng, metric, n_base=50, copies=4, dim=64):
    base = rng.standard_normal((n_base, dim)).astype(np.float32)
    g = base[rng.integers(0, n_base, n_base * copies)]  # bitwise copies scattered over the gallery
    q = rng.standard_normal((37, dim)).astype(np.float32)
    g_ids, q_ids = rng.integers(0, 10, len(g)), rng.integers(0, 10, len(q))
    g_cams, q_cams = rng.integers(0, 3, len(g)), rng.integers(0, 3, len(q))
    return q, g, q_ids, g_ids, q_cams, g_cams


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_identical_gallery_rows_get_identical_distances_for_every_chunk_size(metric):
    rng = np.random.default_rng(11)
    q, g, q_ids, g_ids, q_cams, g_cams = duplicate_heavy(rng, metric)
    _, first = np.unique(g, axis=0, return_inverse=True)  # numpy's own grouping of equal rows
    per_chunking = []
    for chunk_size in (None, 1, 2, 5, 7, 16):
        dist = np.concatenate([c.dist for c in distance_chunks(q, g, q_ids, g_ids, q_cams, g_cams, metric, chunk_size)])
        for group in np.unique(first):
            cols = np.flatnonzero(first == group)
            assert (dist[:, cols] == dist[:, cols[:1]]).all(), "copies of one vector must tie exactly"
        per_chunking.append(dist)
    for dist in per_chunking[1:]:
        np.testing.assert_array_equal(dist, per_chunking[0])  # bitwise, whatever the chunking


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_result_on_duplicate_heavy_data_does_not_depend_on_chunk_size(metric):
    rng = np.random.default_rng(12)
    q, g, q_ids, g_ids, q_cams, g_cams = duplicate_heavy(rng, metric)
    ref = dense_reference(q, g, q_ids, g_ids, q_cams, g_cams, metric, max_rank=20)
    results = [evaluate_reid(q, g, q_ids, g_ids, q_cams, g_cams, metric=metric, max_rank=20, chunk_size=c)
               for c in (None, 1, 3, 8)]
    for r in results:
        np.testing.assert_array_equal(r["cmc"], results[0]["cmc"])
        assert r["mAP"] == results[0]["mAP"] and r["mINP"] == results[0]["mINP"]
        assert_same(r, ref)


def test_find_duplicates_compares_rows_in_full():
    g = np.array([[1.0, 2.0], [1.0, 2.0], [1.0, 2.5], [0.0, 1.0], [-0.0, 1.0], [1.0, 2.0]], np.float32)
    dup = find_duplicates(g)
    np.testing.assert_array_equal(np.sort(dup.cols), [1, 5])
    np.testing.assert_array_equal(dup.first[np.argsort(dup.cols)], [0, 0])  # -0.0 is not a bitwise copy of 0.0
    assert find_duplicates(np.eye(4, dtype=np.float32)) is None


def _numpy_blas_name() -> str:
    """The BLAS numpy was built against as numpy reports it ("scipy-openblas", "mkl", "accelerate", ...)."""
    try:
        return str(np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]).lower()
    except (TypeError, KeyError):  # a numpy without the dict form of its build config
        return "unknown"


def _numpy_openblas(info: list[dict]) -> list[dict]:
    # numpy's own OpenBLAS (torch may bring another); a system numpy links the system's libopenblas
    openblas = [i for i in info if i.get("internal_api") == "openblas"]
    return [i for i in openblas if "numpy" in i.get("filepath", "")] or openblas


def test_blas_kernel_in_use_is_reported():
    # what `make test` varies; the name shows in the test log line of this test with -rA
    from threadpoolctl import threadpool_info

    kernels = {i.get("architecture") for i in _numpy_openblas(threadpool_info())}
    blas = _numpy_blas_name()
    if not kernels and "openblas" not in blas:
        # MKL, Accelerate, ...: OPENBLAS_CORETYPE means nothing to them and make test runs no second pass
        pytest.skip(f"numpy uses {blas} BLAS, not OpenBLAS: no OpenBLAS kernel to report")
    assert kernels, f"numpy is built against {blas} but threadpoolctl sees no OpenBLAS loaded"
    wanted = __import__("os").environ.get("OPENBLAS_CORETYPE")
    if wanted:  # the variable must actually change the kernel, or the second CI pass proves nothing
        assert {str(k).lower() for k in kernels} == {wanted.lower()}, (kernels, wanted)


@pytest.mark.parametrize("machine, info, printed", [
    ("x86_64", [{"internal_api": "mkl", "user_api": "blas", "filepath": "/opt/conda/lib/libmkl_rt.so.2"}], ""),
    ("arm64", [{"internal_api": "accelerate", "user_api": "blas", "filepath": "/System/Accelerate"}], ""),
    ("x86_64", [], ""),
    ("aarch64", [{"internal_api": "openblas", "filepath": "/x/numpy.libs/libopenblas.so", "architecture": "neoversen1"}],
     ""),
    ("x86_64", [{"internal_api": "openblas", "filepath": "/x/numpy.libs/libopenblas.so", "architecture": "SkylakeX"}],
     "Haswell\n"),
    ("x86_64", [{"internal_api": "openblas", "filepath": "/usr/lib/libopenblas.so.0", "architecture": "Haswell"}],
     "Sandybridge\n"),
])
def test_second_blas_kernel_script_prints_a_kernel_only_for_openblas_on_x86_64(monkeypatch, capsys, machine, info,
                                                                                 printed):
    # the Makefile runs the second pass only when the script prints a name: a non-OpenBLAS numpy must print nothing
    import platform
    import runpy
    from pathlib import Path

    import threadpoolctl

    monkeypatch.setattr(threadpoolctl, "threadpool_info", lambda: info)
    monkeypatch.setattr(platform, "machine", lambda: machine)
    runpy.run_path(str(Path(__file__).resolve().parents[1] / ".ci" / "second_blas_kernel.py"))
    assert capsys.readouterr().out == printed


# ---- non-finite / zero-norm rows (issue 12 §3)
@pytest.mark.parametrize("side", ["query", "gallery"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rows_are_refused_naming_side_and_rows(side, bad):
    rng = np.random.default_rng(5)
    q, g, q_ids, g_ids, q_cams, g_cams = make_data(rng)
    x = q if side == "query" else g
    x[[3, 9], 1] = bad
    for metric in ("euclidean", "cosine"):
        with pytest.raises(ValueError, match=rf"^{side} features: 2 non-finite \(NaN/inf\) row\(s\) of {len(x)}, "
                                             r"e.g. row\(s\) 3, 9;") as err:
            evaluate_reid(q, g, q_ids, g_ids, q_cams, g_cams, metric=metric)
        assert "\n" not in str(err.value)


def test_zero_rows_are_refused_for_cosine_only():
    rng = np.random.default_rng(6)
    q, g, q_ids, g_ids, q_cams, g_cams = make_data(rng)
    g[[0, 2, 4, 6, 8, 10, 12]] = 0
    with pytest.raises(ValueError, match=r"gallery features: 7 all-zero .* row\(s\) 0, 2, 4, 6, 8, \.\.\."):
        evaluate_reid(q, g, q_ids, g_ids, q_cams, g_cams, metric="cosine")
    # euclidean distances to the origin are defined: ranked like any other point
    assert_same(evaluate_reid(q, g, q_ids, g_ids, q_cams, g_cams, metric="euclidean", max_rank=20),
                dense_reference(q, g, q_ids, g_ids, q_cams, g_cams, "euclidean", 20))
