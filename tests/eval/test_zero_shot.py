"""Zero-shot, retrieval and linear-probe evaluators on constructed cases with known answers."""
import numpy as np
import pytest

from research.eval import zero_shot as zs


def test_recall_at_k_constructed_matrix():
    # Query 0: its pair ranks 1st; query 1: 2nd; query 2: 3rd; query 3: last (4th).
    sim = np.array([[9, 1, 2, 3],
                    [5, 4, 1, 0],
                    [7, 8, 3, 0],
                    [4, 3, 2, 1]], float)
    assert zs.recall_at_k(sim, ks=(1, 2, 3, 4)) == {1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0}
    # Class-level matches: items {0, 1} are class A, {2, 3} class B.
    labels = np.array([0, 0, 1, 1])
    r = zs.recall_at_k(sim, ks=(1,), match=labels[:, None] == labels[None, :])
    assert r == {1: 0.5}  # rows 0 and 1 hit column 0; rows 2, 3 top is column 1 / 0 (class A)
    with pytest.raises(ValueError, match="k must be"):
        zs.recall_at_k(sim, ks=(5,))


def test_retrieval_metrics_perfect_and_transposed():
    e = np.eye(6)
    m = zs.retrieval_metrics(e, e, labels=np.arange(6) % 3)
    assert m["i2t_recall@1"] == m["t2i_recall@1"] == 1.0 == m["i2t_class_recall@1"]
    # Texts 0 and 1 swapped: image->text recall@1 drops for those two rows, recall@5 stays 1.
    txt = e[[1, 0, 2, 3, 4, 5]]
    m = zs.retrieval_metrics(e, txt, ks=(1, 5))
    assert m["i2t_recall@1"] == pytest.approx(4 / 6) and m["i2t_recall@5"] == 1.0
    assert m["t2i_recall@1"] == pytest.approx(4 / 6)


def test_prompt_ensembling_and_zero_shot_accuracy():
    # Two classes, two prompts each; class 1's prompts point along y with different norms.
    text = np.array([[[1, 0.2, 0], [2, -0.4, 0]], [[0, 1, 0.1], [0, 5, -0.5]]], float)
    cls = np.asarray(zs.ensemble_class_embeddings(text))
    np.testing.assert_allclose(np.linalg.norm(cls, axis=1), 1, rtol=1e-6)
    # Mean of the unit prompt vectors, renormalised (NumPy reference).
    unit = text / np.linalg.norm(text, axis=-1, keepdims=True)
    ref = unit.mean(1) / np.linalg.norm(unit.mean(1), axis=-1, keepdims=True)
    np.testing.assert_allclose(cls, ref, rtol=1e-6, atol=1e-7)
    imgs = np.array([[1, 0.1, 0], [0.2, 1, 0], [3, -1, 0], [-1, 2, 0]], float)
    assert zs.zero_shot_accuracy(imgs, cls, [0, 1, 0, 1]) == 1.0
    assert zs.zero_shot_accuracy(imgs, cls, [1, 1, 0, 0]) == 0.5


def test_linear_probe_separable_and_chance():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8)) * 4
    y = rng.integers(0, 3, 600)
    x = centers[y] + rng.normal(size=(600, 8))
    out = zs.linear_probe(x[:400], y[:400], x[400:], y[400:], num_classes=3, steps=50)
    assert out["accuracy"] > 0.97 and out["train_accuracy"] > 0.97
    noise = rng.normal(size=(600, 8))  # features carry no label information
    out = zs.linear_probe(noise[:400], y[:400], noise[400:], y[400:], num_classes=3, steps=50)
    assert out["accuracy"] < 0.5
