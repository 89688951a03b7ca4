"""The Frechet distance (FID's formula; here on a classifier's features, not Inception's) against
the closed form of the 2-Wasserstein distance between Gaussians, and conditional accuracy."""
from __future__ import annotations

import numpy as np
import pytest

from research.eval import image_metrics as im


def test_frechet_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert im.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    # commuting (diagonal) covariances: |m1 - m2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    m1, m2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 1.0])
    want = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert im.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(want, rel=1e-9)
    # invariant under a rotation of both Gaussians (non-diagonal covariances)
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    got = im.frechet_distance(q @ m1, q @ np.diag(a) @ q.T, q @ m2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(want, rel=1e-6)
    # a distribution is at distance 0 from itself
    c = np.cov(np.random.default_rng(1).normal(size=(50, 3)), rowvar=False)
    assert abs(im.frechet_distance(m1, c, m1, c)) < 1e-6


def test_frechet_of_sampled_features_approaches_the_closed_form():
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 1.0, size=(40000, 2))
    y = rng.normal(1.0, 2.0, size=(40000, 2))
    # 2 * 1^2 (means) + 2 * (1 - 2)^2 (stds) = 4
    assert im.frechet_distance_of_features(x, y) == pytest.approx(4.0, abs=0.1)


def test_conditional_accuracy_and_metrics_with_a_stub_classifier():
    class Stub:  # "classifies" by mean brightness on the 0..255 scale the Classifier API takes
        def predict(self, pixels):
            return (pixels.reshape(len(pixels), -1).mean(-1) > 127.5).astype(int)

        def features(self, pixels):
            return np.stack([pixels.reshape(len(pixels), -1).mean(-1),
                             pixels.reshape(len(pixels), -1).std(-1)], -1)
    images = np.concatenate([-np.ones((3, 4, 4, 1)), np.ones((3, 4, 4, 1))])
    images[:, 0, 0, 0] = np.linspace(-0.5, 0.5, 6)
    assert im.conditional_accuracy(Stub(), images, [0, 0, 0, 1, 1, 1]) == 1.0
    assert im.conditional_accuracy(Stub(), images, [1, 0, 0, 1, 1, 0]) == pytest.approx(4 / 6)
    m = im.ClassifierMetrics(Stub(), images)(images, [0, 0, 0, 1, 1, 1])
    assert m["conditional_accuracy"] == 1.0 and abs(m["frechet_classifier"]) < 1e-6


def test_shape_errors():
    with pytest.raises(ValueError, match="Shapes disagree"):
        im.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="expected"):
        im.feature_stats(np.zeros((1, 3)))
