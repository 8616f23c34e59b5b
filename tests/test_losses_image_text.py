"""CLIP-ReID image-text losses against loop references (and pytorch-metric-learning's
SupConLoss when installed), values and gradients w.r.t. both feature sets and the scale."""

import math

import pytest
import torch
import torch.nn.functional as F

from reidscale.losses import i2t_cross_entropy, supervised_contrastive_i2t, supervised_contrastive_t2i


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


def dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def supcon_loop(anchors, contrast, targets, scale):
    """-(1/N) Σ_i mean_{p: y_p = y_i} log( exp(s a_i·c_p) / Σ_j exp(s a_i·c_j) ), term by term."""
    total = 0.0
    for i in range(len(anchors)):
        log_denominator = torch.log(sum(torch.exp(scale * dot(anchors[i], c)) for c in contrast))
        positives = [p for p in range(len(contrast)) if targets[p] == targets[i]]
        total = total - sum(scale * dot(anchors[i], contrast[p]) - log_denominator for p in positives) / len(positives)
    return total / len(anchors)


def batch(seed, normalize):
    g = torch.Generator().manual_seed(seed)
    targets = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3])  # unequal K, one identity seen once
    images = torch.randn(9, 6, generator=g, dtype=torch.float64)
    # one text feature per identity, repeated for each of its images as in CLIP-ReID stage 1
    texts = torch.randn(4, 6, generator=g, dtype=torch.float64)[targets]
    if normalize:
        images, texts = F.normalize(images, dim=1), F.normalize(texts, dim=1)
    return images, texts, targets


@pytest.mark.parametrize("normalize,scale", [(False, 1.0), (True, 1 / 0.07)], ids=["clipreid-raw", "clip-normalised"])
def test_supcon_i2t_matches_loop_formula_and_its_gradients(normalize, scale):
    images, texts, targets = batch(30, normalize)
    assert_same_value_and_grad(
        lambda v, t, s: supervised_contrastive_i2t(v, t, targets, s),
        lambda v, t, s: supcon_loop(v, t, targets, s),
        images, texts, torch.tensor(scale, dtype=torch.float64),
    )


@pytest.mark.parametrize("normalize,scale", [(False, 1.0), (True, 1 / 0.07)], ids=["clipreid-raw", "clip-normalised"])
def test_supcon_t2i_matches_loop_formula_and_its_gradients(normalize, scale):
    images, texts, targets = batch(31, normalize)
    assert_same_value_and_grad(
        lambda v, t, s: supervised_contrastive_t2i(v, t, targets, s),
        lambda v, t, s: supcon_loop(t, v, targets, s),
        images, texts, torch.tensor(scale, dtype=torch.float64),
    )


def test_i2t_and_t2i_differ_on_the_same_batch():
    images, texts, targets = batch(32, normalize=False)
    i2t = supervised_contrastive_i2t(images, texts, targets, 1.0)
    t2i = supervised_contrastive_t2i(images, texts, targets, 1.0)
    assert not torch.isclose(i2t, t2i)


def test_supcon_with_distinct_identities_is_clip_infonce():
    g = torch.Generator().manual_seed(33)
    images, texts = F.normalize(torch.randn(2, 8, 5, generator=g, dtype=torch.float64), dim=2)
    targets = torch.tensor([7, 2, 5, 0, 1, 3, 4, 6])
    logits = 20.0 * images @ texts.t()
    diagonal = torch.arange(8)
    i2t = supervised_contrastive_i2t(images, texts, targets, 20.0)
    t2i = supervised_contrastive_t2i(images, texts, targets, 20.0)
    torch.testing.assert_close(i2t, F.cross_entropy(logits, diagonal))
    torch.testing.assert_close(t2i, F.cross_entropy(logits.t(), diagonal))


def test_supcon_i2t_matches_pytorch_metric_learning_on_normalised_features():
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses", reason="pytorch-metric-learning not installed")
    from pytorch_metric_learning.reducers import MeanReducer

    images, texts, targets = batch(34, normalize=True)
    scale = 1 / 0.07
    # ref_labels must be a distinct tensor, or PML drops the diagonal (its "self" pairs)
    pml = pml_losses.SupConLoss(temperature=1 / scale, reducer=MeanReducer())
    # PML normalises inside its CosineSimilarity; doing the same keeps the gradients comparable
    assert_same_value_and_grad(
        lambda v, t: supervised_contrastive_i2t(F.normalize(v, dim=1), F.normalize(t, dim=1), targets, scale),
        lambda v, t: pml(v, targets, ref_emb=t, ref_labels=targets.clone()),
        images, texts,
        atol=1e-7,
    )


def i2t_ce_loop(images, all_texts, targets, scale, epsilon):
    """-(1/N) Σ_i Σ_c q_ic log softmax_c(s v_i·t_c), q = (1-ε)·onehot + ε/C."""
    num_classes = len(all_texts)
    total = 0.0
    for i in range(len(images)):
        logits = [scale * dot(images[i], t) for t in all_texts]
        log_z = torch.log(sum(torch.exp(z) for z in logits))
        for c in range(num_classes):
            q = (1 - epsilon) * (1.0 if c == targets[i] else 0.0) + epsilon / num_classes
            total = total - q * (logits[c] - log_z)
    return total / len(images)


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_i2t_cross_entropy_matches_loop_formula_and_its_gradients(epsilon):
    g = torch.Generator().manual_seed(35)
    images = F.normalize(torch.randn(7, 6, generator=g, dtype=torch.float64), dim=1)
    all_texts = F.normalize(torch.randn(5, 6, generator=g, dtype=torch.float64), dim=1)
    targets = torch.tensor([0, 4, 4, 2, 1, 0, 3])
    assert_same_value_and_grad(
        lambda v, t, s: i2t_cross_entropy(v, t, targets, s, epsilon),
        lambda v, t, s: i2t_ce_loop(v, t, targets, s, epsilon),
        images, all_texts, torch.tensor(math.exp(2.5), dtype=torch.float64),
    )


def test_i2t_cross_entropy_without_smoothing_is_plain_cross_entropy():
    g = torch.Generator().manual_seed(36)
    images, all_texts = torch.randn(6, 4, generator=g), torch.randn(3, 4, generator=g)
    targets = torch.tensor([0, 1, 2, 2, 1, 0])
    torch.testing.assert_close(
        i2t_cross_entropy(images, all_texts, targets, 2.0, epsilon=0.0),
        F.cross_entropy(2.0 * images @ all_texts.t(), targets),
    )


def test_image_text_losses_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="text features"):
        supervised_contrastive_i2t(torch.randn(4, 3), torch.randn(3, 3), torch.arange(4), 1.0)
    with pytest.raises(ValueError, match="text features"):
        i2t_cross_entropy(torch.randn(4, 3), torch.randn(5, 2), torch.arange(4), 1.0)
