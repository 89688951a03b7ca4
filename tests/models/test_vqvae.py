"""The VQ autoencoder's pieces against hand computations (references: the VQ-VAE paper's appendix
A.1 EMA equations with Sonnet's Laplace smoothing, written out in numpy here; Jukebox's restart
rule; perplexity = exp(-sum p log p))."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.models import vqvae as vq


def test_straight_through_forward_is_zq_and_gradient_is_identity():
    z_e = jnp.array([[0.3, -1.2], [2.0, 0.5]])
    z_q = jnp.array([[0.0, -1.0], [1.5, 1.0]])
    w = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_allclose(vq.straight_through(z_e, z_q), z_q, atol=1e-7)
    g_e, g_q = jax.grad(lambda a, b: jnp.sum(w * vq.straight_through(a, b)), argnums=(0, 1))(z_e, z_q)
    np.testing.assert_allclose(g_e, w)          # passes straight through to the encoder
    np.testing.assert_allclose(g_q, 0.0)        # nothing reaches the codebook


def test_nearest_codes_match_brute_force():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(7, 3)).astype(np.float32)
    z = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    ref = np.argmin(((z[..., None, :] - emb) ** 2).sum(-1), axis=-1)
    np.testing.assert_array_equal(vq.nearest_codes(jnp.asarray(z), jnp.asarray(emb)), ref)


def test_ema_update_matches_hand_computation():
    # K = 3 codes of D = 2; the batch: two vectors assigned to code 0, one to code 2.
    q = {"embedding": jnp.zeros((3, 2)), "ema_count": jnp.array([2.0, 1.0, 0.5]),
         "ema_sum": jnp.array([[2.0, 0.0], [0.0, 1.0], [0.5, 0.5]])}
    z = jnp.array([[1.0, 3.0], [3.0, 1.0], [-1.0, 1.0]])
    idx = jnp.array([0, 0, 2])
    counts, sums = vq.code_stats(z, idx, 3)
    np.testing.assert_allclose(counts, [2.0, 0.0, 1.0])
    np.testing.assert_allclose(sums, [[4.0, 4.0], [0.0, 0.0], [-1.0, 1.0]])
    d, eps = 0.9, 1e-5
    out = vq.ema_update(q, counts, sums, d, eps)
    # By hand: N = 0.9 * [2, 1, 0.5] + 0.1 * [2, 0, 1] = [2.0, 0.9, 0.55]
    n_k = np.array([2.0, 0.9, 0.55])
    m_k = np.array([[0.9 * 2 + 0.4, 0.4], [0.0, 0.9], [0.45 - 0.1, 0.45 + 0.1]])
    n = n_k.sum()
    smoothed = (n_k + eps) / (n + 3 * eps) * n
    np.testing.assert_allclose(out["ema_count"], n_k, rtol=1e-6)
    np.testing.assert_allclose(out["ema_sum"], m_k, rtol=1e-6)
    np.testing.assert_allclose(out["embedding"], m_k / smoothed[:, None], rtol=1e-5)
    # Without smoothing the codes are the EMA cluster means: code 0 -> (2.2, 0.4) / 2.
    np.testing.assert_allclose(out["embedding"][0], [1.1, 0.2], rtol=1e-4)


def test_dead_codes_are_restarted_from_batch_vectors_and_live_ones_kept():
    q = {"embedding": jnp.arange(8.0).reshape(4, 2), "ema_count": jnp.array([5.0, 0.2, 3.0, 0.0]),
         "ema_sum": jnp.arange(8.0).reshape(4, 2) * 5}
    z = jnp.array([[[10.0, 11.0], [12.0, 13.0], [14.0, 15.0]]])  # [1, 3, D]
    out, n = vq.restart_dead_codes(q, z, jax.random.key(0), threshold=1.0)
    assert int(n) == 2
    for k in (0, 2):  # alive: untouched
        np.testing.assert_array_equal(out["embedding"][k], q["embedding"][k])
        assert float(out["ema_count"][k]) == float(q["ema_count"][k])
    batch = {tuple(v) for v in np.asarray(z).reshape(-1, 2).tolist()}
    for k in (1, 3):  # dead: a batch vector, count 1, sum = the vector
        assert tuple(np.asarray(out["embedding"][k]).tolist()) in batch
        np.testing.assert_array_equal(out["ema_sum"][k], out["embedding"][k])
        assert float(out["ema_count"][k]) == 1.0


def test_perplexity_formula():
    assert float(vq.perplexity(jnp.ones(16))) == pytest.approx(16.0, rel=1e-5)
    assert float(vq.perplexity(jnp.array([0.0, 7.0, 0.0]))) == pytest.approx(1.0, rel=1e-6)
    c = np.array([3.0, 1.0, 0.0, 4.0])
    p = c / c.sum()
    ref = np.exp(-sum(pi * np.log(pi) for pi in p if pi > 0))
    assert float(vq.perplexity(jnp.asarray(c))) == pytest.approx(ref, rel=1e-5)


def test_model_shapes_and_gradients_reach_encoder_not_codebook():
    cfg = vq.VQConfig(channels=(4, 8), num_res_blocks=0, groups=2, latent_dim=3, codebook_size=16)
    assert cfg.latent_shape(28) == (14, 14, 3)
    model = vq.VQVAE(cfg)
    x = jax.random.uniform(jax.random.key(1), (2, 28, 28, 1), minval=-1, maxval=1)
    params = model.init(jax.random.key(0), x)["params"]
    np.testing.assert_array_equal(params["quantizer"]["ema_sum"], params["quantizer"]["embedding"])

    def loss(p):
        out = model.apply({"params": p}, x)
        return jnp.mean((out["recon"] - x) ** 2) + 0.25 * out["commitment"]

    out = model.apply({"params": params}, x)
    assert out["recon"].shape == x.shape and out["z_e"].shape == (2, 14, 14, 3)
    np.testing.assert_allclose(out["z_q"], params["quantizer"]["embedding"][out["indices"]])
    g = jax.grad(loss)(params)
    assert all(float(jnp.abs(v).max()) == 0 for v in jax.tree.leaves(g["quantizer"]))
    assert float(jnp.abs(g["encoder"]["conv_in"]["kernel"]).max()) > 0
    with pytest.raises(ValueError, match="does not divide"):
        cfg.latent_shape(27)
