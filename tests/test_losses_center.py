"""CenterLoss against a per-sample loop reference, values and gradients (features and centres)."""

import pytest
import torch

from reidscale.losses import CenterLoss


def center_loop(features, centers, targets):
    """(1/N) Σ_i ||x_i - c_{y_i}||², one coordinate at a time."""
    total = 0.0
    for i in range(len(features)):
        total = total + sum((features[i, d] - centers[targets[i], d]) ** 2 for d in range(features.shape[1]))
    return total / len(features)


def test_center_loss_matches_loop_formula_and_its_gradients():
    torch.manual_seed(20)
    loss_fn = CenterLoss(num_classes=5, feat_dim=4).double()
    features = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 0, 1, 3, 3, 3, 4, 1, 0])  # class 2 absent: its centre gets no gradient

    loss = loss_fn(features, targets)
    grads = torch.autograd.grad(loss, [features, loss_fn.centers])
    ref = center_loop(features, loss_fn.centers, targets)
    ref_grads = torch.autograd.grad(ref, [features, loss_fn.centers])

    torch.testing.assert_close(loss, ref)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)
    assert torch.equal(grads[1][2], torch.zeros(4, dtype=torch.float64))


def test_center_loss_is_zero_at_the_centres():
    loss_fn = CenterLoss(num_classes=3, feat_dim=2)
    targets = torch.tensor([2, 0, 2])
    assert loss_fn(loss_fn.centers.detach()[targets], targets).item() == 0.0


def test_class_means_are_the_optimal_centres():
    loss_fn = CenterLoss(num_classes=2, feat_dim=3).double()
    features = torch.randn(6, 3, dtype=torch.float64)
    targets = torch.tensor([0, 1, 0, 1, 1, 0])
    with torch.no_grad():
        loss_fn.centers.copy_(torch.stack([features[targets == c].mean(0) for c in range(2)]))
    (grad,) = torch.autograd.grad(loss_fn(features, targets), loss_fn.centers)
    torch.testing.assert_close(grad, torch.zeros_like(grad))


def test_center_loss_rejects_wrong_feature_dim():
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        CenterLoss(num_classes=3, feat_dim=4)(torch.randn(2, 5), torch.tensor([0, 1]))
