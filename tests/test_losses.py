"""ID (label-smoothed cross-entropy) and batch-hard triplet losses against references.

References are per-element loops written here from the papers' formulas, plus
pytorch-metric-learning where it implements the same definition (skipped if absent).
Values and gradients are compared on the same float64 inputs.
"""

import pytest
import torch
import torch.nn.functional as F

from reidscale.losses import cross_entropy_label_smooth, triplet_batch_hard


def _value_and_grad(fn, *inputs):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    value = fn(*leaves)
    return value.detach(), torch.autograd.grad(value, leaves)


def assert_same_value_and_grad(fn, reference, *inputs, atol=1e-9):
    value, grads = _value_and_grad(fn, *inputs)
    ref_value, ref_grads = _value_and_grad(reference, *inputs)
    torch.testing.assert_close(value, ref_value, atol=atol, rtol=1e-7)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=atol, rtol=1e-7)


def pk_labels(p, k):
    return torch.arange(p).repeat_interleave(k)


# ---------------------------------------------------------------- cross-entropy


def ce_label_smooth_loop(logits, targets, epsilon):
    """-(1/N) Σ_i Σ_c q_ic log softmax(z_i)_c with q = (1-ε)·onehot + ε/C, one term at a time."""
    n, c = logits.shape
    total = 0.0
    for i in range(n):
        log_z = torch.log(sum(torch.exp(logits[i, j]) for j in range(c)))
        for j in range(c):
            q = (1 - epsilon) * (1.0 if j == targets[i] else 0.0) + epsilon / c
            total = total - q * (logits[i, j] - log_z)
    return total / n


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.35])
def test_label_smooth_ce_matches_loop_formula_and_its_gradient(epsilon):
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 5, (6,), generator=g)
    assert_same_value_and_grad(
        lambda z: cross_entropy_label_smooth(z, targets, epsilon),
        lambda z: ce_label_smooth_loop(z, targets, epsilon),
        logits,
    )


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.35])
def test_label_smooth_ce_matches_torch_label_smoothing(epsilon):
    g = torch.Generator().manual_seed(1)
    logits = 4 * torch.randn(32, 11, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 11, (32,), generator=g)
    assert_same_value_and_grad(
        lambda z: cross_entropy_label_smooth(z, targets, epsilon),
        lambda z: F.cross_entropy(z, targets, label_smoothing=epsilon),
        logits,
    )


def test_label_smooth_ce_with_zero_epsilon_is_plain_cross_entropy():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(16, 7, generator=g)
    targets = torch.randint(0, 7, (16,), generator=g)
    torch.testing.assert_close(cross_entropy_label_smooth(logits, targets, 0.0), F.cross_entropy(logits, targets))


def test_label_smoothing_changes_the_loss():
    g = torch.Generator().manual_seed(3)
    logits = 5 * torch.randn(8, 4, generator=g)
    targets = torch.randint(0, 4, (8,), generator=g)
    plain, smoothed = cross_entropy_label_smooth(logits, targets, 0.0), cross_entropy_label_smooth(logits, targets, 0.1)
    assert not torch.isclose(plain, smoothed)


def test_label_smooth_ce_is_finite_for_extreme_logits():
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]], requires_grad=True)
    loss = cross_entropy_label_smooth(logits, torch.tensor([1, 1]), 0.1)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("epsilon", [-0.1, 1.0])
def test_label_smooth_ce_rejects_epsilon_outside_unit_interval(epsilon):
    with pytest.raises(ValueError, match="epsilon"):
        cross_entropy_label_smooth(torch.zeros(2, 3), torch.tensor([0, 1]), epsilon)


# ---------------------------------------------------------------- batch-hard triplet


def batch_hard_loop(features, targets, margin, soft_margin=False, normalize=False):
    """Hermans et al. (2017) eq. 5, one anchor at a time; anchors lacking a positive or a
    negative are skipped (the documented choice)."""
    if normalize:
        features = torch.stack([f / torch.linalg.norm(f) for f in features])
    losses = []
    for a in range(len(features)):
        others = range(len(features))
        pos = [torch.linalg.norm(features[a] - features[p]) for p in others if p != a and targets[p] == targets[a]]
        neg = [torch.linalg.norm(features[a] - features[n]) for n in others if targets[n] != targets[a]]
        if not pos or not neg:
            continue
        gap = max(pos) - min(neg)
        losses.append(F.softplus(gap) if soft_margin else torch.clamp(gap + margin, min=0))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("margin", [0.3, 3.0])
@pytest.mark.parametrize("soft_margin", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_batch_hard_triplet_matches_loop_formula_and_its_gradient(margin, soft_margin, normalize):
    g = torch.Generator().manual_seed(4)
    features = torch.randn(12, 8, generator=g, dtype=torch.float64)
    targets = pk_labels(4, 3)[torch.randperm(12, generator=g)]
    assert_same_value_and_grad(
        lambda x: triplet_batch_hard(x, targets, margin, soft_margin, normalize),
        lambda x: batch_hard_loop(x, targets, margin, soft_margin, normalize),
        features,
    )
    assert triplet_batch_hard(features, targets, margin, soft_margin, normalize) > 0


def test_batch_hard_triplet_margin_changes_the_loss():
    g = torch.Generator().manual_seed(5)
    features = torch.randn(12, 8, generator=g)
    targets = pk_labels(4, 3)
    assert not torch.isclose(triplet_batch_hard(features, targets, 0.3), triplet_batch_hard(features, targets, 1.0))


def test_batch_hard_triplet_has_finite_gradients_with_duplicate_features():
    g = torch.Generator().manual_seed(6)
    # every identity's K images share one feature vector, and two identities coincide
    base = torch.randn(3, 8, generator=g)
    features = torch.cat([base, base[:1]]).repeat_interleave(4, dim=0).requires_grad_(True)
    targets = pk_labels(4, 4)
    for soft_margin in (False, True):
        loss = triplet_batch_hard(features, targets, 0.3, soft_margin)
        (grad,) = torch.autograd.grad(loss, features)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # all-identical features: every distance is the clamped minimum
    same = torch.ones(8, 4, requires_grad=True)
    loss = triplet_batch_hard(same, pk_labels(2, 4), 0.3, normalize_features=True)
    (grad,) = torch.autograd.grad(loss, same)
    assert torch.isclose(loss, torch.tensor(0.3)) and torch.isfinite(grad).all()


def test_batch_hard_triplet_skips_anchor_without_positive():
    g = torch.Generator().manual_seed(7)
    features = torch.randn(7, 5, generator=g, dtype=torch.float64)
    targets = torch.tensor([0, 0, 1, 1, 2, 2, 9])  # identity 9 is a singleton
    assert_same_value_and_grad(
        lambda x: triplet_batch_hard(x, targets, 1.0),
        lambda x: batch_hard_loop(x, targets, 1.0),
        features,
    )
    # the singleton only takes part as a negative: same value as dropping it when it is far away
    far = features.clone()
    far[6] = 100.0
    torch.testing.assert_close(triplet_batch_hard(far, targets, 1.0), triplet_batch_hard(far[:6], targets[:6], 1.0))


@pytest.mark.parametrize(
    "targets", [torch.zeros(6, dtype=torch.long), torch.arange(6)], ids=["one-identity", "all-singletons"]
)
def test_batch_hard_triplet_without_any_triplet_is_zero_and_backpropagates(targets):
    features = torch.randn(6, 4, requires_grad=True)
    loss = triplet_batch_hard(features, targets)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(features.grad, torch.zeros_like(features))


def test_batch_hard_triplet_upcasts_half_precision():
    g = torch.Generator().manual_seed(8)
    features = torch.randn(8, 16, generator=g)
    targets = pk_labels(2, 4)
    loss = triplet_batch_hard(features.bfloat16(), targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, triplet_batch_hard(features.bfloat16().float(), targets))


@pytest.mark.parametrize("margin", [0.3, 3.0])
def test_batch_hard_triplet_matches_pytorch_metric_learning(margin):
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses", reason="pytorch-metric-learning not installed")
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.miners import BatchHardMiner
    from pytorch_metric_learning.reducers import MeanReducer

    g = torch.Generator().manual_seed(9)
    features = torch.randn(16, 8, generator=g, dtype=torch.float64)
    targets = pk_labels(4, 4)[torch.randperm(16, generator=g)]
    distance = LpDistance(normalize_embeddings=False)
    miner = BatchHardMiner(distance=distance)
    pml = pml_losses.TripletMarginLoss(margin=margin, distance=distance, reducer=MeanReducer())
    assert_same_value_and_grad(
        lambda x: triplet_batch_hard(x, targets, margin),
        lambda x: pml(x, targets, miner(x, targets)),
        features,
        atol=1e-7,
    )
