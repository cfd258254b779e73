"""Bag-of-features evaluation: kNN against a brute-force reference, the linear probe's reporting rules,
seeded feature extraction, and the full protocol on tiny data."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from empssl.config import Config
from empssl.data import ImageData
from empssl.evaluate import (
    RNG_CHUNK,
    EvalError,
    ProbeError,
    ProbeResult,
    _chunk_generator,
    evaluate,
    extract_features,
    knn_predict,
    linear_probe,
    stratified_split,
)
from empssl.models import EMPSSLModel
from empssl.patches import Augment, make_patches

from .conftest import assert_hit_rate


def blobs(n_per_class: int, num_classes: int, dim: int, spread: float, noise: float, seed: int,
          centre_seed: int = 0):
    """Gaussian blobs: (n_per_class * num_classes, dim) features and their labels, class-interleaved.
    Splits drawn with the same ``centre_seed`` and different ``seed`` share their class centres."""
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(centre_seed)) * spread
    labels = torch.arange(num_classes).repeat(n_per_class)
    noise_g = torch.Generator().manual_seed(1000 + seed)
    feats = centres[labels] + noise * torch.randn(labels.numel(), dim, generator=noise_g)
    return feats, labels


# --------------------------------------------------------------------------------------------- kNN


def knn_reference(train_feats, train_labels, test_feats, num_classes, k, temperature):
    """The weighted kNN written out one test point at a time, in float64, from the formula."""
    preds = []
    for x in test_feats.double():
        sims = [float(x @ t.double() / (x.norm() * t.double().norm())) for t in train_feats]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[int(train_labels[i])] += math.exp(sims[i] / temperature)
        preds.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return torch.tensor(preds)


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (7, 0.07), (20, 0.5)])
def test_knn_matches_bruteforce_reference(k, temperature):
    g = torch.Generator().manual_seed(0)
    train = torch.randn(60, 8, generator=g)
    labels = torch.randint(0, 5, (60,), generator=g)
    test = torch.randn(25, 8, generator=g)
    got = knn_predict(train, labels, test, 5, k=k, temperature=temperature, chunk=7)  # chunking exercised
    assert torch.equal(got, knn_reference(train, labels, test, 5, k, temperature))


def test_knn_separated_clusters_are_perfect():
    train, train_y = blobs(20, 4, 16, spread=5.0, noise=0.3, seed=1)
    test, test_y = blobs(10, 4, 16, spread=5.0, noise=0.3, seed=2)
    assert torch.equal(knn_predict(train, train_y, test, 4, k=5), test_y)


def test_knn_uses_cosine_not_euclidean():
    # Scaling features must not change anything: they are L2-normalised first.
    train, train_y = blobs(10, 3, 8, spread=1.0, noise=1.0, seed=2)
    test, _ = blobs(5, 3, 8, spread=1.0, noise=1.0, seed=3)
    a = knn_predict(train, train_y, test, 3, k=5)
    b = knn_predict(train * torch.rand(30, 1) * 100, train_y, test * 0.01, 3, k=5)
    assert torch.equal(a, b)


def test_knn_clamps_k_to_training_set():
    train, train_y = blobs(2, 3, 8, spread=1.0, noise=1.0, seed=4)  # 6 training points
    test, _ = blobs(4, 3, 8, spread=1.0, noise=1.0, seed=5)
    assert torch.equal(knn_predict(train, train_y, test, 3, k=100), knn_predict(train, train_y, test, 3, k=6))


def test_knn_small_temperature_does_not_overflow():
    train, train_y = blobs(10, 3, 8, spread=3.0, noise=0.1, seed=6)
    pred = knn_predict(train, train_y, train, 3, k=5, temperature=1e-4)
    assert torch.equal(pred, train_y)


def test_knn_input_errors():
    x, y = torch.randn(10, 4), torch.zeros(10, dtype=torch.long)
    with pytest.raises(EvalError):
        knn_predict(x, y, torch.randn(3, 5), 2)  # feature sizes differ
    with pytest.raises(EvalError):
        knn_predict(x, y[:5], torch.randn(3, 4), 2)  # labels do not match features
    with pytest.raises(EvalError):
        knn_predict(x, y + 2, torch.randn(3, 4), 2)  # label out of range
    with pytest.raises(EvalError):
        knn_predict(x, y, torch.randn(3, 4), 2, k=0)


# ------------------------------------------------------------------------------------ linear probe


def test_probe_separable_blobs_and_final_epoch():
    train, train_y = blobs(40, 3, 10, spread=4.0, noise=0.5, seed=7)
    test, test_y = blobs(20, 3, 10, spread=4.0, noise=0.5, seed=8)
    res = linear_probe(train, train_y, test, test_y, 3, epochs=10, batch_size=16)
    assert isinstance(res, ProbeResult)
    assert res.top1 == pytest.approx(100.0)
    assert res.epoch == 10 and res.val_top1 is None
    assert [h["epoch"] for h in res.history] == list(range(1, 11))
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert all("val_top1" not in h for h in res.history)


def test_probe_is_deterministic_given_seed():
    train, train_y = blobs(30, 3, 10, spread=1.0, noise=1.0, seed=8)
    test, test_y = blobs(10, 3, 10, spread=1.0, noise=1.0, seed=9)
    kw = {"epochs": 4, "batch_size": 10, "val_fraction": 0.2}
    a = linear_probe(train, train_y, test, test_y, 3, seed=3, **kw)
    b = linear_probe(train, train_y, test, test_y, 3, seed=3, **kw)
    c = linear_probe(train, train_y, test, test_y, 3, seed=4, **kw)
    assert (a.top1, a.epoch, a.val_top1, a.history) == (b.top1, b.epoch, b.val_top1, b.history)
    assert a.history != c.history


def test_stratified_split_sizes_and_determinism():
    labels = torch.cat([torch.full((10,), 0), torch.full((20,), 1), torch.full((30,), 2)])
    labels = labels[torch.randperm(60, generator=torch.Generator().manual_seed(0))]
    tr, val = stratified_split(labels, 0.2, seed=1)
    assert torch.bincount(labels[val]).tolist() == [2, 4, 6]
    assert torch.bincount(labels[tr]).tolist() == [8, 16, 24]
    assert sorted(tr.tolist() + val.tolist()) == list(range(60))  # disjoint and complete
    assert torch.equal(val, stratified_split(labels, 0.2, seed=1)[1])
    assert not torch.equal(val, stratified_split(labels, 0.2, seed=2)[1])
    # Every class keeps a training example; a too-small fraction is an error, not an empty val set.
    tr, val = stratified_split(torch.tensor([0, 0, 1]), 0.9, seed=0)
    assert set(torch.tensor([0, 0, 1])[tr].tolist()) == {0, 1}
    with pytest.raises(ProbeError):
        stratified_split(torch.arange(5), 0.3, seed=0)  # singleton classes: nothing to hold out


def test_probe_selects_on_validation_never_on_test():
    # A noisy problem with a large learning rate, so validation accuracy moves from epoch to epoch.
    train, train_y = blobs(40, 4, 12, spread=1.0, noise=1.5, seed=10)
    test, test_y = blobs(30, 4, 12, spread=1.0, noise=1.5, seed=11)
    kw = {"epochs": 12, "lr": 1.0, "batch_size": 8, "val_fraction": 0.25, "seed": 0}
    res = linear_probe(train, train_y, test, test_y, 4, **kw)
    vals = [h["val_top1"] for h in res.history]
    assert len(set(vals)) > 1, "validation accuracy should vary for this test to mean something"
    assert res.epoch == vals.index(max(vals)) + 1  # earliest best validation epoch
    assert res.val_top1 == max(vals)
    # 40 per class, 25% held out -> 10 per class in validation: val accuracy is a multiple of 100/40.
    assert all(abs(v / 2.5 - round(v / 2.5)) < 1e-6 for v in vals)
    # Scrambling the test labels changes the test accuracy but not the choice.
    shuffled = test_y[torch.randperm(test_y.numel(), generator=torch.Generator().manual_seed(0))]
    res2 = linear_probe(train, train_y, test, shuffled, 4, **kw)
    assert (res2.epoch, res2.val_top1, res2.history) == (res.epoch, res.val_top1, res.history)
    assert res2.top1 != res.top1


def test_probe_input_errors():
    x, y = torch.randn(10, 4), torch.zeros(10, dtype=torch.long)
    with pytest.raises(ProbeError):
        linear_probe(x, y, torch.randn(3, 5), y[:3], 2)
    with pytest.raises(ProbeError):
        linear_probe(x, y, x, y, 2, epochs=0)
    with pytest.raises(ProbeError):
        linear_probe(x, y, x, y, 2, val_fraction=1.0)


# ------------------------------------------------------------------------------- feature extraction


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = EMPSSLModel(width=4, hidden_dim=48, z_dim=16)
    # Non-trivial BatchNorm running statistics, so that eval mode actually differs from train mode.
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(16, 3, 16, 16) * 2 + 0.5)
    images = torch.randint(0, 256, (RNG_CHUNK + 9, 3, 24, 24), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    return model, images, Augment(size=16)


def test_extract_features_shapes_and_kinds(tiny):
    model, images, aug = tiny
    pre = extract_features(model, images[:5], aug, 4)
    assert pre.shape == (5, 48) and pre.dtype == torch.float32 and pre.device.type == "cpu"
    assert torch.isfinite(pre).all()
    back = extract_features(model, images[:5], aug, 4, kind="backbone")
    assert back.shape == (5, 8 * 4)
    assert extract_features(model, images[:5], aug, 1).shape == pre.shape


def test_extract_features_is_the_mean_over_seeded_patches(tiny):
    model, images, aug = tiny
    x = images[:6]  # one generator chunk
    model.eval()
    with torch.no_grad():
        patches = make_patches(x, 5, aug, _chunk_generator(7, 0, torch.device("cpu")))  # (5, 6, 3, 16, 16)
        expected = model.features(patches.flatten(0, 1), "pre").view(5, 6, -1).mean(0)
    got = extract_features(model, x, aug, 5, seed=7)
    torch.testing.assert_close(got, expected)


def test_extract_features_deterministic_and_batch_independent(tiny):
    model, images, aug = tiny
    a = extract_features(model, images, aug, 3, seed=0)
    b = extract_features(model, images, aug, 3, seed=0)
    assert torch.equal(a, b)
    assert not torch.allclose(a, extract_features(model, images, aug, 3, seed=1))
    # Several generator chunks, forwarded one image at a time versus all at once.
    torch.testing.assert_close(extract_features(model, images, aug, 3, seed=0, batch_images=1), a)
    torch.testing.assert_close(extract_features(model, images, aug, 3, seed=0, batch_images=1000), a)


def test_extract_features_uses_eval_mode_and_restores_it(tiny):
    model, images, aug = tiny
    model.train()
    a = extract_features(model, images[:4], aug, 2)
    assert model.training
    model.eval()
    b = extract_features(model, images[:4], aug, 2)
    assert not model.training
    assert torch.equal(a, b)  # BatchNorm used its running statistics both times


def test_extract_features_input_errors(tiny):
    model, images, aug = tiny
    with pytest.raises(EvalError):
        extract_features(model, images.float(), aug, 2)
    with pytest.raises(EvalError):
        extract_features(model, images[:0], aug, 2)
    with pytest.raises(EvalError):
        extract_features(model, images, aug, 0)
    with pytest.raises(EvalError):
        extract_features(model, images, aug, 2, kind="proj")


# ------------------------------------------------------------------------------------ full protocol


def random_split(n: int, seed: int) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 24, 24), dtype=torch.uint8, generator=g)
    return ImageData(images, torch.arange(n) % 3, ["a", "b", "c"])


@pytest.mark.parametrize("val_fraction", [0.0, 0.25])
def test_evaluate_returns_the_protocol(tiny, val_fraction):
    model, _, _ = tiny
    cfg = Config(patch_size=16, test_patches=2, probe_epochs=3, probe_batch_size=10, knn_k=100,
                 probe_val_fraction=val_fraction)
    assert Augment.from_config(cfg).size == 16
    lines: list[str] = []
    train_split, test_split = random_split(24, 0), random_split(12, 1)
    res = evaluate(model, train_split, test_split, cfg, "cpu", progress=False, log=lines.append)
    # kNN against a loop written from its definition (cosine similarity, k nearest vote with exp(sim / T))
    train_f, test_f = (F.normalize(extract_features(model, s.images, Augment.from_config(cfg), 2), dim=1)
                       for s in (train_split, test_split))
    hits = 0
    for f, label in zip(test_f, test_split.labels):
        sims = train_f @ f
        top = sims.topk(res["knn_k"]).indices
        votes = torch.zeros(3, dtype=torch.float64)
        for i in top.tolist():
            votes[train_split.labels[i]] += math.exp(sims[i].item() / cfg.knn_temperature)
        hits += int(votes.argmax()) == int(label)
    assert res["knn_top1"] == pytest.approx(100 * hits / 12)
    assert_hit_rate(res["linear_top1"], 12)
    assert res["test_patches"] == 2 and res["feature"] == "pre" and res["feature_dim"] == 48
    assert (res["n_train"], res["n_test"], res["num_classes"]) == (24, 12, 3)
    assert res["knn_k"] == 24  # clamped to the training set
    assert res["probe_epoch"] == 3 if val_fraction == 0 else 1 <= res["probe_epoch"] <= 3
    assert (res["probe_val_top1"] is None) == (val_fraction == 0)
    assert all(res[k] >= 0 for k in ("feature_seconds", "probe_seconds", "knn_seconds"))
    assert len(lines) == 1 and "2 test patches" in lines[0] and "pre-feature" in lines[0]


def test_evaluate_rejects_mismatched_classes(tiny):
    model, _, _ = tiny
    test = random_split(6, 1)
    test = ImageData(test.images, test.labels, ["a", "b", "x"])
    with pytest.raises(EvalError):
        evaluate(model, random_split(6, 0), test, Config(patch_size=16, test_patches=1), "cpu", progress=False)


def test_large_patches_are_forwarded_in_fewer_patches_per_pass():
    """The bytes of a pass, not its patch count, stay what they are at 32 px: 200 x 224 px evaluation (128 test
    patches) would otherwise hold 16,384 patches of 224 px at once on a GPU (~10 GB of float32 patches alone)."""
    from empssl.evaluate import default_patches_per_forward

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert default_patches_per_forward(cuda, 32) == 16384 and default_patches_per_forward(cpu, 16) == 4096
    assert default_patches_per_forward(cuda, 224) == 16384 * 32 * 32 // (224 * 224) == 334
    assert default_patches_per_forward(cpu, 64) == 1024
