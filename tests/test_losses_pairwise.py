"""Contrastive and circle losses against per-pair loop references (and
pytorch-metric-learning's CircleLoss when installed), values and gradients."""

import math

import numpy as np
import pytest
import torch

from reidscale.losses import circle_loss, contrastive_loss


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


def dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def unit(v):
    return v / torch.sqrt(dot(v, v))


# ---------------------------------------------------------------- contrastive


def contrastive_loop(features, targets, margin, normalize):
    """Hadsell et al. eq. 4 without the ½ factors, one unordered pair at a time."""
    if normalize:
        features = [unit(f) for f in features]
    terms = []
    for i in range(len(features)):
        for j in range(i + 1, len(features)):
            d = torch.sqrt(sum((a - b) ** 2 for a, b in zip(features[i], features[j])))
            terms.append(d**2 if targets[i] == targets[j] else torch.clamp(margin - d, min=0) ** 2)
    return sum(terms) / len(terms)


@pytest.mark.parametrize(
    "margin,normalize,scale", [(1.0, True, 1.0), (0.5, True, 1.0), (1.5, False, 0.3), (6.0, False, 2.0)]
)
def test_contrastive_matches_loop_formula_and_its_gradient(margin, normalize, scale):
    g = torch.Generator().manual_seed(10)
    features = scale * torch.randn(10, 4, generator=g, dtype=torch.float64)
    targets = pk_labels(5, 2)[torch.randperm(10, generator=g)]
    assert_same_value_and_grad(
        lambda x: contrastive_loss(x, targets, margin, normalize),
        lambda x: contrastive_loop(x, targets, margin, normalize),
        features,
    )


def test_contrastive_negatives_inside_the_margin_are_penalised():
    g = torch.Generator().manual_seed(11)
    features = torch.randn(10, 4, generator=g)
    targets = pk_labels(5, 2)
    small, large = contrastive_loss(features, targets, 0.5), contrastive_loss(features, targets, 1.5)
    assert large > small


def test_contrastive_is_zero_for_collapsed_identities_beyond_the_margin():
    # two identities on orthogonal axes: positives coincide, negatives are √2 > 1 apart
    features = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    assert contrastive_loss(features, torch.tensor([0, 0, 1, 1]), margin=1.0).item() == pytest.approx(0.0, abs=1e-10)
    assert contrastive_loss(features, torch.tensor([0, 0, 1, 1]), margin=2.0) > 0.1


def test_contrastive_has_finite_gradients_with_duplicate_features():
    base = torch.randn(2, 6)
    # duplicates inside an identity and across identities (a negative pair at distance 0)
    features = torch.cat([base[0:1], base[0:1], base[0:1], base[1:2]]).requires_grad_(True)
    targets = torch.tensor([0, 0, 1, 1])
    for normalize in (True, False):
        loss = contrastive_loss(features, targets, 1.0, normalize)
        (grad,) = torch.autograd.grad(loss, features)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_contrastive_with_only_singletons_uses_the_negative_pairs():
    g = torch.Generator().manual_seed(12)
    features = torch.randn(5, 3, generator=g, dtype=torch.float64)
    targets = torch.arange(5)
    assert_same_value_and_grad(
        lambda x: contrastive_loss(x, targets, 1.5),
        lambda x: contrastive_loop(x, targets, 1.5, True),
        features,
    )


def test_contrastive_of_a_single_image_is_zero_and_backpropagates():
    features = torch.randn(1, 4, requires_grad=True)
    loss = contrastive_loss(features, torch.tensor([3]))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(features.grad, torch.zeros_like(features))


# ---------------------------------------------------------------- circle


def log_sum_exp(xs):
    """log Σ exp(x), shifted by the max so γ = 256 does not overflow float64."""
    top = max(x.detach() for x in xs)
    return top + torch.log(sum(torch.exp(x - top) for x in xs))


def circle_loop(features, targets, m, gamma):
    """Sun et al. (2020) eq. 6 with pair-wise labels, one anchor at a time; α's are
    constants in backprop; anchors lacking a positive or a negative are skipped."""
    features = [unit(f) for f in features]
    losses = []
    for a in range(len(features)):
        sp = [dot(features[a], features[p]) for p in range(len(features)) if p != a and targets[p] == targets[a]]
        sn = [dot(features[a], features[n]) for n in range(len(features)) if targets[n] != targets[a]]
        if not sp or not sn:
            continue
        logit_p = [-gamma * torch.clamp(1 + m - s.detach(), min=0) * (s - (1 - m)) for s in sp]
        logit_n = [gamma * torch.clamp(s.detach() + m, min=0) * (s - m) for s in sn]
        x = log_sum_exp(logit_p) + log_sum_exp(logit_n)
        losses.append(log_sum_exp([torch.zeros_like(x), x]))  # softplus(x) = log(1 + e^x)
    return sum(losses) / len(losses)


@pytest.mark.parametrize("m,gamma", [(0.25, 256.0), (0.4, 80.0), (0.25, 8.0)])
def test_circle_matches_loop_formula_and_its_gradient(m, gamma):
    g = torch.Generator().manual_seed(13)
    features = torch.randn(12, 6, generator=g, dtype=torch.float64)
    targets = pk_labels(4, 3)[torch.randperm(12, generator=g)]
    assert_same_value_and_grad(
        lambda x: circle_loss(x, targets, m, gamma),
        lambda x: circle_loop(x, targets, m, gamma),
        features,
        atol=1e-8,
    )


def test_circle_skips_anchor_without_positive():
    g = torch.Generator().manual_seed(14)
    features = torch.randn(7, 5, generator=g, dtype=torch.float64)
    targets = torch.tensor([0, 0, 1, 1, 2, 2, 9])
    assert_same_value_and_grad(
        lambda x: circle_loss(x, targets, 0.25, 32.0),
        lambda x: circle_loop(x, targets, 0.25, 32.0),
        features,
    )


def test_circle_margin_changes_the_loss():
    g = torch.Generator().manual_seed(15)
    features = torch.randn(12, 6, generator=g)
    targets = pk_labels(4, 3)
    assert not torch.isclose(circle_loss(features, targets, 0.25, 32.0), circle_loss(features, targets, 0.4, 32.0))


def test_circle_is_finite_in_float32_with_large_gamma_and_duplicates():
    # orthogonal identities (cosine 0), each scaled (the loss normalises), identity 3 a copy of
    # identity 0 (cosine 1 to a negative): a seeded batch whose loss has a closed form
    g = torch.Generator().manual_seed(16)
    base = torch.eye(3, 8)[torch.randperm(3, generator=g)] * (0.5 + torch.rand(3, 1, generator=g))
    features = torch.cat([base, base[:1]]).repeat_interleave(4, dim=0).requires_grad_(True)
    gamma, m = 256.0, 0.25
    loss = circle_loss(features, pk_labels(4, 4), m, gamma)
    (grad,) = torch.autograd.grad(loss, features)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()

    def logit_p(s):
        return -gamma * max(1 + m - s, 0) * (s - (1 - m))

    def logit_n(s):
        return gamma * max(s + m, 0) * (s - m)

    # every anchor has 3 positives at cosine 1; identities 0 and 3 have 4 negatives at cosine 1
    # and 8 at 0 (logit γ·(1+m)·(1-m) = 240 each for the first), identities 1 and 2 have 12 at 0
    pos = np.logaddexp.reduce([logit_p(1.0)] * 3)
    twin = np.logaddexp(0, pos + np.logaddexp.reduce([logit_n(1.0)] * 4 + [logit_n(0.0)] * 8))
    other = np.logaddexp(0, pos + np.logaddexp.reduce([logit_n(0.0)] * 12))
    np.testing.assert_allclose(loss.item(), (8 * twin + 8 * other) / 16, rtol=1e-5)


@pytest.mark.parametrize(
    "targets", [torch.zeros(6, dtype=torch.long), torch.arange(6)], ids=["one-identity", "all-singletons"]
)
def test_circle_without_any_valid_anchor_is_zero_and_backpropagates(targets):
    features = torch.randn(6, 4, requires_grad=True)
    loss = circle_loss(features, targets)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(features.grad, torch.zeros_like(features))


@pytest.mark.parametrize("m,gamma", [(0.25, 256.0), (0.4, 80.0)])
def test_circle_matches_pytorch_metric_learning(m, gamma):
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses", reason="pytorch-metric-learning not installed")
    from pytorch_metric_learning.reducers import MeanReducer

    g = torch.Generator().manual_seed(16)
    features = torch.randn(16, 8, generator=g, dtype=torch.float64)
    targets = pk_labels(4, 4)[torch.randperm(16, generator=g)]
    pml = pml_losses.CircleLoss(m=m, gamma=gamma, reducer=MeanReducer())
    assert_same_value_and_grad(
        lambda x: circle_loss(x, targets, m, gamma),
        lambda x: pml(x, targets),
        features,
        atol=1e-7,
    )
    assert not math.isclose(circle_loss(features, targets, m, gamma).item(), 0.0, abs_tol=1e-3)
