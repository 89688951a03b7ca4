"""Tests for research.generate.beam_search: greedy equivalence, exhaustive-search reference,
recomputed scores, EOS handling, argument checks, and token-for-token agreement with Hugging Face
``generate(num_beams=...)`` on a random GPT-2 whose weights are loaded into our ``Decoder``."""
import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.generate import beam_search, generate
from research.models.transformer import Decoder, TransformerConfig

TINY = TransformerConfig(vocab_size=5, num_layers=2, num_heads=2, embed_dim=16, max_len=8)
SMALL = TransformerConfig(vocab_size=11, num_layers=2, num_heads=2, embed_dim=16, max_len=16)


def random_params(cfg, seed, scale):
    """Parameters drawn with numpy on ``eval_shape`` shapes, std 0.02 * scale (LayerNorm scales
    1 + noise): peaked, far-from-uniform next-token distributions."""
    shapes = nn.unbox(jax.eval_shape(Decoder(cfg).init, jax.random.PRNGKey(0),
                                     jnp.zeros((1, 2), jnp.int32))["params"])
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        x = rng.normal(0.0, 0.02 * scale, leaf.shape).astype(np.float32)
        return jnp.asarray(x + (jax.tree_util.keystr(path).endswith("['scale']")))
    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def tiny():
    return Decoder(TINY), random_params(TINY, 1, 40.0)


@pytest.fixture(scope="module")
def small():
    return Decoder(SMALL), random_params(SMALL, 0, 5.0)


@functools.lru_cache(maxsize=None)
def _log_softmax_forward(model):
    return jax.jit(lambda p, t: jax.nn.log_softmax(model.apply({"params": p}, t)))


def sequence_logprobs(model, params, seqs, t0, eos_id=None):
    """Total log-prob of each row's tokens after position t0 under a full forward (float64 sums),
    up to and including the first ``eos_id``; and the number of tokens counted."""
    seqs = np.asarray(seqs)
    logp = np.asarray(_log_softmax_forward(model)(params, jnp.asarray(seqs)), np.float64)
    totals, lengths = [], []
    for row, lp in zip(seqs, logp):
        total, n = 0.0, 0
        for t in range(t0, seqs.shape[1]):
            total += lp[t - 1, row[t]]
            n += 1
            if eos_id is not None and row[t] == eos_id:
                break
        totals.append(total)
        lengths.append(n)
    return np.array(totals), np.array(lengths)


# ----------------------------------------------------------------------------- (a) greedy

def test_one_beam_is_greedy(small):
    model, params = small
    prompt = jax.random.randint(jax.random.PRNGKey(3), (2, 3), 0, SMALL.vocab_size)
    tokens, scores = beam_search(model, params, prompt, num_beams=1, max_new_tokens=10)
    greedy = generate(model, params, prompt, max_new_tokens=10, rng=None, greedy=True)
    assert tokens.shape == (2, 13) and tokens.dtype == jnp.int32 and scores.shape == (2,)
    np.testing.assert_array_equal(tokens, greedy)
    assert len(np.unique(np.asarray(tokens)[:, 3:])) > 2  # not a degenerate constant output
    total, _ = sequence_logprobs(model, params, tokens, 3)
    np.testing.assert_allclose(scores, total / 10, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- (b) exhaustive

N_NEW = 3


@pytest.fixture(scope="module")
def exhaustive(tiny):
    """Every continuation of 3 tokens (5^3 = 125) of two prompts, with its total log-prob."""
    model, params = tiny
    prompts = np.array([[0, 3], [4, 1]], np.int32)
    conts = np.array(list(itertools.product(range(TINY.vocab_size), repeat=N_NEW)), np.int32)
    out = []
    for p in prompts:
        seqs = np.concatenate([np.broadcast_to(p, (len(conts), 2)), conts], axis=1)
        out.append((seqs, sequence_logprobs(model, params, seqs, 2)[0]))
    return prompts, out


def test_wide_beam_finds_exhaustive_optimum(tiny, exhaustive):
    model, params = tiny
    prompts, per_row = exhaustive
    for lp in (0.0, 1.0):
        tokens, scores = beam_search(model, params, prompts, num_beams=TINY.vocab_size ** 2,
                                     max_new_tokens=N_NEW, length_penalty=lp)
        for b, (seqs, totals) in enumerate(per_row):
            best = int(np.argmax(totals))
            assert np.sort(totals)[-1] - np.sort(totals)[-2] > 1e-4  # a unique optimum
            np.testing.assert_array_equal(tokens[b], seqs[best])
            np.testing.assert_allclose(scores[b], totals[best] / N_NEW ** lp, rtol=1e-5)


def test_narrow_beam_scores_are_recomputed_logprobs(tiny, exhaustive):
    model, params = tiny
    prompts, per_row = exhaustive
    for num_beams, lp in [(2, 0.0), (2, 1.0), (2, 2.0)]:
        tokens, scores = beam_search(model, params, prompts, num_beams=num_beams,
                                     max_new_tokens=N_NEW, length_penalty=lp,
                                     return_all_beams=True)
        assert tokens.shape == (2, num_beams, 2 + N_NEW) and scores.shape == (2, num_beams)
        assert np.all(np.diff(np.asarray(scores), axis=1) <= 0)  # best first
        flat = np.asarray(tokens).reshape(-1, 2 + N_NEW)
        total, _ = sequence_logprobs(model, params, flat, 2)
        np.testing.assert_allclose(np.asarray(scores).reshape(-1), total / N_NEW ** lp,
                                   rtol=1e-5, atol=1e-6)
        for b, (_, totals) in enumerate(per_row):
            assert scores[b, 0] * N_NEW ** lp <= totals.max() + 1e-5
        assert len({tuple(r) for r in flat}) == len(flat)  # distinct hypotheses


# ----------------------------------------------------------------------------- (d) EOS

def test_eos_hypotheses_are_padded_and_scored_by_their_length(small):
    model, params = small
    prompt = jax.random.randint(jax.random.PRNGKey(7), (2, 3), 0, SMALL.vocab_size)
    greedy = np.asarray(generate(model, params, prompt, max_new_tokens=10, rng=None, greedy=True))
    eos = int(greedy[0, 5])  # a token that the model does produce
    for lp in (0.0, 1.0, 2.0):
        tokens, scores = beam_search(model, params, prompt, num_beams=3, max_new_tokens=10,
                                     length_penalty=lp, eos_id=eos, return_all_beams=True)
        flat = np.asarray(tokens).reshape(-1, 13)
        total, length = sequence_logprobs(model, params, flat, 3, eos_id=eos)
        np.testing.assert_allclose(np.asarray(scores).reshape(-1), total / length ** lp,
                                   rtol=1e-5, atol=1e-6)
        for row, n in zip(flat, length):
            assert np.all(row[3 + n:] == eos)  # padded with eos_id after the EOS
        if lp == 0.0:  # (longer hypotheses can win with lp > 0)
            assert (length < 10).any()  # some hypotheses did finish early


def test_eos_as_first_greedy_token_stops_at_once(small):
    model, params = small
    prompt = jnp.array([[1, 2, 3], [4, 5, 6]], jnp.int32)
    first = int(generate(model, params, prompt, max_new_tokens=10, rng=None, greedy=True)[0, 3])
    tokens, scores = beam_search(model, params, prompt, num_beams=1, max_new_tokens=10,
                                 eos_id=first)
    np.testing.assert_array_equal(tokens[0], [1, 2, 3] + [first] * 10)  # row 0: EOS at once
    total, _ = sequence_logprobs(model, params, tokens[:1, :4], 3)
    np.testing.assert_allclose(scores[0], total[0], rtol=1e-5)


@pytest.mark.parametrize("kwargs,name", [
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=2.0), "num_beams"),
    (dict(num_beams=True), "num_beams"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=14), "max_new_tokens"),  # 3 + 14 > max_len 16
    (dict(length_penalty=float("nan")), "length_penalty"),
    (dict(eos_id=11), "eos_id"),
    (dict(eos_id=-1), "eos_id"),
])
def test_bad_arguments_raise(small, kwargs, name):
    model, params = small
    args = {**dict(num_beams=2, max_new_tokens=4), **kwargs}
    with pytest.raises(ValueError, match=name):
        beam_search(model, params, jnp.ones((1, 3), jnp.int32), **args)


def test_bad_prompt_and_context_message(small):
    model, params = small
    with pytest.raises(ValueError, match="prompt"):
        beam_search(model, params, jnp.ones((3,), jnp.int32), num_beams=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_len=16"):
        beam_search(model, params, jnp.ones((1, 16), jnp.int32), num_beams=2, max_new_tokens=1)


# ----------------------------------------------------------------------------- (c) HF GPT-2

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

HF_VOCAB, HF_LEN = 48, 24


def params_from_gpt2(sd, cfg):
    """Minimal GPT-2 -> Decoder mapping (Conv1D weights are [in, out]; c_attn is q|k|v), used
    only where ``research.convert.hf_gpt2`` is missing."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in sd.items()}
    e, h, d = cfg.embed_dim, cfg.num_heads, cfg.head_dim
    ln = lambda p: {"scale": sd[p + ".weight"], "bias": sd[p + ".bias"]}  # noqa: E731
    params = {"token_embed": {"embedding": sd["transformer.wte.weight"]},
              "pos_embed": sd["transformer.wpe.weight"], "final_norm": ln("transformer.ln_f")}
    for i in range(cfg.num_layers):
        p = f"transformer.h.{i}."
        w, b = sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"]
        attn = {name: {"kernel": w[:, j * e:(j + 1) * e].reshape(e, h, d),
                       "bias": b[j * e:(j + 1) * e].reshape(h, d)}
                for j, name in enumerate(("query", "key", "value"))}
        attn["out"] = {"kernel": sd[p + "attn.c_proj.weight"].reshape(h, d, e),
                       "bias": sd[p + "attn.c_proj.bias"]}
        params[f"layer_{i}"] = {
            "attn_norm": ln(p + "ln_1"), "attn": attn, "mlp_norm": ln(p + "ln_2"),
            "mlp": {"fc_in": {"kernel": sd[p + "mlp.c_fc.weight"], "bias": sd[p + "mlp.c_fc.bias"]},
                    "fc_out": {"kernel": sd[p + "mlp.c_proj.weight"],
                               "bias": sd[p + "mlp.c_proj.bias"]}}}
    return jax.tree.map(jnp.asarray, params)


@pytest.fixture(scope="module")
def hf_pair():
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(
        vocab_size=HF_VOCAB, n_positions=HF_LEN, n_embd=32, n_layer=2, n_head=4,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        initializer_range=0.3, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = transformers.GPT2LMHeadModel(hf_cfg).float().eval()
    try:  # the project's converter when present, else the minimal mapping above
        from research.convert.hf_gpt2 import config_from_hf, params_from_hf_state_dict
    except ImportError:
        cfg = TransformerConfig(vocab_size=HF_VOCAB, num_layers=2, num_heads=4, embed_dim=32,
                                max_len=HF_LEN, activation="gelu_tanh")
        params = params_from_gpt2(hf.state_dict(), cfg)
    else:
        cfg = config_from_hf(hf.config)
        params = jax.tree.map(jnp.asarray, params_from_hf_state_dict(hf.state_dict(), cfg))
    model = Decoder(cfg)
    # The mapping is right: same full-forward logits.
    ids = np.random.default_rng(0).integers(0, HF_VOCAB, (2, HF_LEN))
    with torch.no_grad():
        expected = hf(torch.from_numpy(ids)).logits.numpy()
    got = np.asarray(model.apply({"params": params}, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-4)
    assert expected.std() > 1.0  # peaked distributions: no near-ties between beams
    return hf, model, params


@pytest.mark.parametrize("eos_id,length_penalty", [(None, 1.0), (7, 1.0), (7, 0.0), (7, 2.0)],
                         ids=["no_eos", "eos_lp1", "eos_lp0", "eos_lp2"])
def test_matches_hugging_face_beam_search(hf_pair, eos_id, length_penalty):
    hf, model, params = hf_pair
    prompts = np.array([[3, 14, 15, 9], [26, 5, 35, 8]], np.int64)
    n_new = 8
    tokens, scores = beam_search(model, params, prompts, num_beams=4, max_new_tokens=n_new,
                                 length_penalty=length_penalty, eos_id=eos_id)
    gen_cfg = transformers.GenerationConfig(
        num_beams=4, max_new_tokens=n_new, do_sample=False, early_stopping=True,
        length_penalty=length_penalty, eos_token_id=eos_id, pad_token_id=eos_id,
        output_scores=True, return_dict_in_generate=True)
    finished_early = False
    for b in range(len(prompts)):  # one row at a time: HF crops rows to the longest output
        with torch.no_grad():
            out = hf.generate(torch.from_numpy(prompts[b:b + 1]),
                              attention_mask=torch.ones((1, 4), dtype=torch.long),
                              generation_config=gen_cfg)
        seq = out.sequences[0].numpy()
        finished_early |= len(seq) < 4 + n_new
        if eos_id is not None:
            seq = np.pad(seq, (0, 4 + n_new - len(seq)), constant_values=eos_id)
        np.testing.assert_array_equal(tokens[b], seq)
        np.testing.assert_allclose(scores[b], out.sequences_scores[0].item(), rtol=1e-4,
                                   atol=1e-5)
    if eos_id is not None and length_penalty == 0.0:
        assert finished_early  # the EOS case does exercise early finishing
    if eos_id is None:  # and beam search is not just greedy decoding here
        with torch.no_grad():
            greedy = hf.generate(torch.from_numpy(prompts), attention_mask=torch.ones((2, 4)),
                                 max_new_tokens=n_new, do_sample=False, num_beams=1,
                                 pad_token_id=None, eos_token_id=None)
        assert (greedy.numpy() != np.asarray(tokens)).any()
