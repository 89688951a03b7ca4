"""Evaluators for image-text models: zero-shot classification with prompt ensembling, retrieval
recall@k, and a linear probe (multinomial logistic regression) on frozen features.

All take embeddings (numpy or jax arrays), not models, so they are tested on constructed cases:

- ``ensemble_class_embeddings(text_emb [C, T, D])``: CLIP's prompt ensembling (Radford et al.
  2021, Sec. 3.1.4): the L2-normalised mean of the normalised embeddings of the T prompts of each
  class, renormalised;
- ``zero_shot_accuracy(image_emb, class_emb, labels)``: argmax of cosine similarity;
- ``recall_at_k(sim, ks, match)``: the fraction of queries (rows) whose top-k columns hold a
  match (``match[i, j]`` True; the diagonal by default, i.e. the paired item);
- ``linear_probe(train_x, train_y, test_x, test_y)``: logistic regression on standardised
  features with L2 regularisation, fitted full-batch with L-BFGS (optax), as CLIP's linear probes
  (which used scikit-learn's L-BFGS logistic regression).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _normalize(x, axis=-1):
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def ensemble_class_embeddings(text_emb) -> jax.Array:
    """[C, T, D] prompt embeddings (T templates per class) -> [C, D] unit class embeddings."""
    text_emb = jnp.asarray(text_emb)
    if text_emb.ndim != 3:
        raise ValueError(f"Expected prompt embeddings [classes, templates, dim]; got shape "
                         f"{text_emb.shape}")
    return _normalize(_normalize(text_emb).mean(axis=1))


def zero_shot_logits(image_emb, class_emb) -> jax.Array:
    return _normalize(image_emb) @ _normalize(class_emb).T


def zero_shot_accuracy(image_emb, class_emb, labels) -> float:
    pred = np.asarray(jnp.argmax(zero_shot_logits(image_emb, class_emb), axis=-1))
    return float(np.mean(pred == np.asarray(labels)))


def recall_at_k(sim, ks: Sequence[int] = (1, 5), match=None) -> dict[int, float]:
    """``sim`` [Q, N] query-candidate scores -> {k: fraction of queries with a match among their
    top-k candidates}. ``match`` [Q, N] bool (default: the identity, candidate i pairs query i;
    pass ``labels[:, None] == labels[None, :]`` to count any item of the same class). Ties are
    broken towards the lower column index."""
    sim = np.asarray(sim, np.float64)
    q, n = sim.shape
    if match is None:
        if q != n:
            raise ValueError(f"recall_at_k without `match` needs a square similarity matrix; got "
                             f"{sim.shape}")
        match = np.eye(n, dtype=bool)
    match = np.asarray(match, bool)
    order = np.argsort(-sim, axis=1, kind="stable")
    hits = np.take_along_axis(match, order, axis=1)
    out = {}
    for k in ks:
        if not 1 <= k <= n:
            raise ValueError(f"recall@{k} with {n} candidates: k must be in [1, {n}]")
        out[k] = float(hits[:, :k].any(axis=1).mean())
    return out


def retrieval_metrics(image_emb, text_emb, labels=None, ks: Sequence[int] = (1, 5)
                      ) -> dict[str, float]:
    """Image->text and text->image recall@k over paired rows (row i of each is one pair); with
    ``labels`` also the class-level recall (a retrieved item of the query's class counts)."""
    sim = np.asarray(_normalize(image_emb) @ _normalize(text_emb).T)
    out = {}
    for name, s in (("i2t", sim), ("t2i", sim.T)):
        for k, v in recall_at_k(s, ks).items():
            out[f"{name}_recall@{k}"] = v
        if labels is not None:
            labels = np.asarray(labels)
            same = labels[:, None] == labels[None, :]
            for k, v in recall_at_k(s, ks, same).items():
                out[f"{name}_class_recall@{k}"] = v
    return out


def linear_probe(train_x, train_y, test_x, test_y, num_classes: int | None = None,
                 l2: float = 1e-4, steps: int = 200) -> dict[str, float]:
    """Multinomial logistic regression on frozen features: standardise with the training
    statistics, minimise mean cross-entropy + ``l2`` * ||W||^2 with L-BFGS for ``steps``
    iterations; returns train and test accuracy."""
    train_x = jnp.asarray(train_x, jnp.float32)
    test_x = jnp.asarray(test_x, jnp.float32)
    train_y = jnp.asarray(train_y, jnp.int32)
    c = int(num_classes or int(max(np.max(np.asarray(train_y)), np.max(np.asarray(test_y)))) + 1)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    xs, xt = (train_x - mean) / std, (test_x - mean) / std
    w = fit_logistic_regression(xs, train_y, c, l2, steps)
    acc = lambda x, y: float(np.mean(np.asarray(jnp.argmax(x @ w["w"] + w["b"], -1)) == np.asarray(y)))  # noqa: E731
    return {"train_accuracy": acc(xs, train_y), "accuracy": acc(xt, test_y)}


def fit_logistic_regression(x, y, num_classes: int, l2: float = 1e-4, steps: int = 200):
    """{'w': [D, C], 'b': [C]} minimising mean CE + l2 * ||w||^2 (L-BFGS, ``steps`` iterations)."""
    def objective(p):
        logits = x @ p["w"] + p["b"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce + l2 * jnp.sum(p["w"] ** 2)

    params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    @jax.jit
    def run(params):
        def body(carry, _):
            p, state = carry
            value, grad = value_and_grad(p, state=state)
            updates, state = opt.update(grad, state, p, value=value, grad=grad,
                                        value_fn=objective)
            return (optax.apply_updates(p, updates), state), value
        (p, _), _ = jax.lax.scan(body, (params, opt.init(params)), None, length=steps)
        return p

    return run(params)
