"""Search settings calibrated on the gallery's own vectors; bad vectors refused (library level, no Ray)."""

import numpy as np
import pyarrow as pa
import pytest

from reidscale.index import calibrate as cal_mod
from reidscale.index.build import build_index, default_search_params
from reidscale.index.calibrate import CalibrationSpec, exact_topk, sample_query_rows
from reidscale.index.gallery import Gallery
from reidscale.index.synthetic_embeddings import DISTRIBUTIONS, generate, participation_ratio, spectrum

FACTORY = "IVF128,PQ16x4fs,RFlat"


def _meta(identity):
    n = len(identity)
    return pa.table({"row_id": np.arange(n, dtype=np.int64), "identity": np.asarray(identity, np.int64),
                     "camera": np.zeros(n, np.int32), "path": [""] * n})


def _numpy_topk(q, x, k):
    """Reference: full similarity matrix, stable sort (float64, so no BLAS-dependent ties)."""
    sims = q.astype(np.float64) @ x.astype(np.float64).T
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


def _recall(found, truth):
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


@pytest.fixture(scope="module")
def hard():
    """20k × 32-d, centres spread over every dimension: the spectrum that defeats nprobe = max(16, nlist/64)."""
    x, identity, q, _ = generate(DISTRIBUTIONS["highdim"], 20_000, 32, n_queries=300, seed=1)
    return x, identity, q


def test_generator_has_the_asked_spectrum_distractors_and_long_tail():
    for eff in (6, 50, 200):
        assert participation_ratio(spectrum(256, eff)) == pytest.approx(eff, rel=1e-3)
    x, identity, q, q_ident = generate(DISTRIBUTIONS["middim"], 20_000, 64, n_queries=100, seed=0)
    assert x.shape == (20_000, 64) and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert np.mean(identity == -1) == pytest.approx(0.2, abs=1e-3)
    counts = np.bincount(identity[identity >= 0])
    assert counts.max() >= 20 * np.median(counts)  # a long tail of very large identities
    assert set(q_ident) <= set(identity[identity >= 0]) and len(q) == 100


def test_chunked_exact_search_equals_brute_force(monkeypatch, hard):
    x, _, q = hard
    monkeypatch.setattr(cal_mod, "CHUNK", 3001)  # many uneven chunks, merged
    ids = np.arange(len(x), dtype=np.int64) * 3 + 5
    _, found = exact_topk([(x[:7000], ids[:7000]), (x[7000:], ids[7000:])], q[:50], 10, "ip")
    truth = ids[_numpy_topk(q[:50], x, 10)]
    assert _recall(found, truth) >= 0.999  # float32 vs float64 may swap a near-tie at rank 10


def test_calibrated_settings_reach_the_target_where_the_fixed_rule_misses(tmp_path, hard):
    x, identity, q = hard
    spec = CalibrationSpec(target_recall=0.95, recall_k=10, sample=1000, seed=3)
    manifest = build_index(x, _meta(identity), tmp_path, factory=FACTORY, calibration=spec, log=lambda *_: None)
    cal = manifest["calibration"]
    assert cal["reached"] and cal["recall_at_k"] >= 0.95 and cal["sample"] == 1000 and cal["seed"] == 3
    assert manifest["search"] == cal["chosen"] and cal["qps"] > 0 and (tmp_path / "calibration.png").stat().st_size
    truth = _numpy_topk(q, x, 10)

    # the old fixed rule on this data: a fifth of the true neighbours lost
    old = Gallery(tmp_path, search_params=default_search_params(FACTORY, len(x)))
    assert _recall(old.search(q, 10)[1], truth) < 0.9

    gallery = Gallery(tmp_path)  # opened as a reader would: the calibrated settings apply
    # independent check 1: the same sampled gallery rows, exact search by numpy, own row excluded
    rows = sample_query_rows(identity, 1000, 3)
    assert len(np.unique(identity[rows])) == 1000 and (identity[rows] >= 0).all()
    ids = gallery.search(x[rows], 11)[1]
    found = np.array([[i for i in r if i != s][:10] for r, s in zip(ids, rows)])
    ref = np.array([[i for i in r if i != s][:10] for r, s in zip(_numpy_topk(x[rows], x, 11), rows)])
    assert abs(_recall(found, ref) - cal["recall_at_k"]) <= 0.01
    # independent check 2: real queries (other images of gallery identities), never seen by calibration
    assert _recall(gallery.search(q, 10)[1], truth) >= 0.95 - 0.015


def test_unreachable_target_is_reported_and_the_best_setting_kept(tmp_path, hard):
    x, identity, _ = hard
    # 4 codes of 8 dims and no re-ranking: no nprobe reaches 0.99
    spec = CalibrationSpec(target_recall=0.99, sample=300)
    manifest = build_index(x, _meta(identity), tmp_path, factory="IVF64,PQ4x4fs", calibration=spec,
                           memory_budget_bytes=1 << 30, log=lambda *_: None)
    cal = manifest["calibration"]
    assert not cal["reached"]
    best = max(r["recall_at_k"] for r in cal["tried"])
    assert cal["recall_at_k"] == best < 0.99 and manifest["search"] == cal["chosen"]
    assert {r["params"]["nprobe"] for r in cal["tried"]} >= {1, 64}  # searched up to every cell
    msg = cal["message"]
    assert "\n" not in msg and "not reached" in msg and "1.00 GiB" in msg and f"{best:.4f}" in msg


def test_explicit_calibrate_and_large_add_publish_new_generations(tmp_path, hard):
    x, identity, q = hard
    spec = CalibrationSpec(sample=300, recalibrate_fraction=0.1)
    build_index(x[:10_000], _meta(identity[:10_000]), tmp_path, factory="IVF64,PQ8x4fs,RFlat", calibration=spec,
                train_size=2048, log=lambda *_: None)
    gallery = Gallery(tmp_path)
    assert gallery.manifest["calibration"]["ntotal"] == 10_000
    gallery.add(x[10_000:10_500], identity[10_000:10_500])  # 5%: below the fraction, no re-measure
    assert gallery.generation == 1 and gallery.manifest["calibration"]["ntotal"] == 10_000
    gallery.add(x[10_500:12_000], identity[10_500:12_000])  # 20% since calibration: re-measured
    assert gallery.generation == 3
    cal = gallery.manifest["calibration"]
    assert cal["generation"] == 3 and cal["ntotal"] == 12_000 and cal["sample"] == 300 and cal["reached"]
    report = gallery.calibrate(q[:200])
    assert gallery.generation == 4 and report["queries_source"] == "given queries"
    # the published settings really are what a new reader searches with
    _, ids = Gallery(tmp_path).search(q[:200], 10)
    assert abs(_recall(ids, _numpy_topk(q[:200], x[:12_000], 10)) - report["recall_at_k"]) <= 0.01


def test_add_and_search_refuse_non_finite_and_zero_vectors(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    build_index(x, _meta(np.arange(200)), tmp_path, factory="Flat", log=lambda *_: None)
    gallery = Gallery(tmp_path)
    bad = x[:10].copy()
    bad[[2, 7], 3] = np.nan
    with pytest.raises(ValueError, match=r"added vectors: row 2, 7 \(2 rows\) not finite"):
        gallery.add(bad, np.zeros(10))
    assert gallery.ntotal == 200 and gallery.generation == 0  # nothing published
    q = x[:4].copy()
    q[1, 0] = np.inf
    with pytest.raises(ValueError, match=r"queries: row 1 \(1 row\) not finite"):
        gallery.search(q, 5)
    q[1] = 0.0
    with pytest.raises(ValueError, match=r"queries: row 1 \(1 row\) zero norm"):
        gallery.search_identities(q, 5)
    many = np.full((12, 8), np.nan, np.float32)
    with pytest.raises(ValueError, match=r"row 0, 1, 2, 3, 4, \.\.\. \(12 rows\)"):
        gallery.search(many, 1)


def test_build_refuses_bad_precomputed_vectors_naming_file_and_rows(tmp_path):
    from reidscale.index.job import load_precomputed

    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 8)).astype(np.float32)
    x[41] = 0.0
    x[97, 5] = np.nan
    np.save(tmp_path / "g.npy", x)
    vectors, meta, _ = load_precomputed(tmp_path / "g.npy")
    with pytest.raises(ValueError, match=r"g\.npy: row 97 \(1 row\) not finite"):
        build_index(vectors, meta, tmp_path / "i", source=f"{tmp_path / 'g.npy'}", log=lambda *_: None)
    x[97] = 1.0
    np.save(tmp_path / "g.npy", x)
    vectors, meta, _ = load_precomputed(tmp_path / "g.npy")
    with pytest.raises(ValueError, match=r"g\.npy: row 41 \(1 row\) zero norm"):
        build_index(vectors, meta, tmp_path / "i", source=f"{tmp_path / 'g.npy'}", log=lambda *_: None)
    assert not (tmp_path / "i" / "manifest.json").exists()
    # a zero vector is a valid point for metric l2
    build_index(np.asarray(vectors), meta, tmp_path / "l2", metric="l2", factory="Flat", log=lambda *_: None)


@pytest.mark.parametrize("key,value", [("target_recall", 1.5), ("recall_k", 0), ("calibration_sample", 0),
                                       ("recalibrate_fraction", 0.0), ("calibration_queries", "missing.npy"),
                                       ("calibration_confidence", 1.0)])
def test_build_job_config_names_a_bad_calibration_key(key, value):
    from reidscale.config import ConfigError
    from reidscale.index.job import IndexJobConfig

    with pytest.raises(ConfigError, match=f"^{key}: "):
        IndexJobConfig(**{key: value}).validate()


def _staged_search(truth, need):
    """A search whose recall is 1 once nprobe reaches need[k_factor_rf] (else 0.5) and whose time
    grows with nprobe: the climb's order and its early stop, without an index."""
    import time

    def search(q, k, params):
        # cells scanned × (1 + re-ranking width): the shape of IVF-PQ's cost, steps ≥ 40 ms apart
        time.sleep(0.02 * params["nprobe"] * (1 + params["k_factor_rf"] / 64))
        found = truth[: len(q), :k].copy()
        if params["nprobe"] < need[params["k_factor_rf"]]:
            found[:, k // 2 :] = -1
        return found

    return search


def test_climb_starts_each_narrower_reranking_where_the_wider_one_reached_the_target():
    truth = np.arange(40 * 10).reshape(40, 10)
    search = _staged_search(truth, {64: 8, 16: 12, 4: 32})
    report = cal_mod.calibrate_settings(search, np.zeros((40, 4), np.float32), truth, "IVF64,PQ2x4fs,RFlat",
                                        CalibrationSpec(target_recall=0.95))
    tried = [(r["params"]["k_factor_rf"], r["params"]["nprobe"]) for r in report["tried"]]
    # kf 64 from 1 up to 8; kf 16 from 8 to 12; kf 4 from 12, stopped at 16: slower than kf 16 at 12
    assert tried == [(64, p) for p in (1, 2, 3, 4, 6, 8)] + [(16, 8), (16, 12), (4, 12), (4, 16)]
    reached = [r for r in report["tried"] if r["recall_at_k"] >= 0.95]
    assert report["reached"] and report["chosen"] == max(reached, key=lambda r: r["qps"])["params"]


def test_an_unreachable_target_costs_one_ladder_not_one_per_reranking_width():
    truth = np.arange(40 * 10).reshape(40, 10)
    search = _staged_search(truth, {64: 10**9, 16: 10**9, 4: 10**9})
    report = cal_mod.calibrate_settings(search, np.zeros((40, 4), np.float32), truth, "IVF8,PQ2x4fs,RFlat",
                                        CalibrationSpec(target_recall=0.95))
    assert [(r["params"]["k_factor_rf"], r["params"]["nprobe"]) for r in report["tried"]] == \
        [(64, p) for p in (1, 2, 3, 4, 6, 8)]
    assert not report["reached"] and report["recall_at_k"] == 0.5


def test_a_setting_reaches_the_target_only_when_its_recall_is_surely_above_it():
    """Mean recall 0.96 at nprobe 4, but every tenth query finds only 6 of 10: with 40 queries
    the lower 95% bound is below 0.95, so calibration goes on to nprobe 6 (all found); comparing
    the mean alone (confidence 0.5) stops at 4. The bound is checked against the plain formula."""
    truth = np.arange(40 * 10).reshape(40, 10)

    def search(q, k, params):
        found = np.tile(truth[:, :1], (1, k)) * 0 - 1
        found[:, :10] = truth
        if params["nprobe"] < 4:
            found[:, 5:] = -1
        elif params["nprobe"] < 6:
            found[::10, 6:] = -1  # 4 of 40 queries at 0.6, the rest at 1.0: mean 0.96
        return found[:, :k]

    q = np.zeros((40, 4), np.float32)
    strict = cal_mod.calibrate_settings(search, q, truth, "IVF8,Flat", CalibrationSpec(target_recall=0.95))
    plain = cal_mod.calibrate_settings(search, q, truth, "IVF8,Flat",
                                       CalibrationSpec(target_recall=0.95, confidence=0.5))
    assert plain["chosen"] == {"nprobe": 4} and plain["recall_at_k"] == pytest.approx(0.96)
    assert strict["chosen"] == {"nprobe": 6} and strict["recall_at_k"] == 1.0
    at4 = next(r for r in strict["tried"] if r["params"] == {"nprobe": 4})
    per_query = np.where(np.arange(40) % 10 == 0, 0.6, 1.0)
    expect = per_query.mean() - 1.6448536 * per_query.std(ddof=1) / np.sqrt(40)
    assert at4["recall_at_k_low"] == pytest.approx(expect, abs=1e-6) and expect < 0.95
