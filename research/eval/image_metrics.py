"""Sample-quality metrics for generated images that run offline.

**This is not Inception FID.** ``frechet_distance`` is FID's formula (Heusel et al. 2017), the
2-Wasserstein distance between two Gaussians fitted to features,
``||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})``, but the features are the penultimate
layer of the project's own Fashion-MNIST classifier (``research.tasks.classify.load_classifier``,
e.g. the CNN of ``configs/cnn_fashion_mnist.py``), not Inception-v3's pool features: the numbers
compare models measured with the same classifier only, not with published FIDs.

``conditional_accuracy``: the fraction of class-conditional samples the classifier assigns to the
requested class.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and (unbiased) covariance [D, D] of features [N, D], in float64."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features of shape {f.shape}: expected [N >= 2, D]")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2). A singular product gets
    ``eps`` added to both diagonals (as pytorch-fid does)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"Shapes disagree: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs "
                         f"{s2.shape}")
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(s1)) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)  # sqrtm's tiny imaginary parts are numerical noise
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def frechet_distance_of_features(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def to_pixels(images: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] (the generative models' range), NHWC -> float32 on the 0..255 scale that
    ``Classifier`` expects (clipped)."""
    return np.clip((np.asarray(images, np.float32) + 1.0) * 127.5, 0.0, 255.0)


def conditional_accuracy(classifier, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of ``images`` (in [-1, 1]) that ``classifier`` assigns to ``labels``."""
    pred = classifier.predict(to_pixels(images))
    return float(np.mean(pred == np.asarray(labels)))


class ClassifierMetrics:
    """Frechet distance (classifier features; not Inception FID) and conditional accuracy of
    generated images against a reference set of real images (e.g. the test split)."""

    def __init__(self, classifier, real_images: np.ndarray):
        self.classifier = classifier
        self.real_stats = feature_stats(classifier.features(to_pixels(real_images)))

    def __call__(self, images: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
        feats = self.classifier.features(to_pixels(images))
        out = {"frechet_classifier": frechet_distance(*feature_stats(feats), *self.real_stats)}
        if labels is not None:
            out["conditional_accuracy"] = conditional_accuracy(self.classifier, images, labels)
        return out
