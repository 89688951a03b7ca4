"""Tests of research.data.arithmetic: correct answers (checked with Python's own arithmetic on
the decoded text), determinism and exact resume, and no held-out problem in the training stream."""
import numpy as np
import pytest

from research.core.config import ConfigError
from research.data.arithmetic import (
    BOS, EOS, PAD, ArithmeticSpec, ArithmeticStream, Vocab, encode_batch, held_out, problem_key)

SPEC = ArithmeticSpec(ops="+-*", min_digits=1, max_digits=3)


def decode_rows(batch):
    v = Vocab()
    return [(v.decode(s), v.decode(o)) for s, o in zip(batch["src"], batch["tgt_out"])]


def test_answers_are_correct_and_layout():
    stream = ArithmeticStream(SPEC, 256, seed=0)
    batch = next(stream)
    assert batch["src"].shape == (256, SPEC.src_len) and batch["src"].dtype == np.int32
    assert batch["tgt_in"].shape == batch["tgt_out"].shape == (256, SPEC.tgt_len)
    ops = set()
    for (src, ans), tin, tout in zip(decode_rows(batch), batch["tgt_in"], batch["tgt_out"]):
        assert src.endswith("=")
        a, op, b = next((src[:i], src[i], src[i + 1:-1]) for i in range(1, len(src))
                        if src[i] in "+-*")
        ops.add(op)
        assert 1 <= len(a) <= 3 and 1 <= len(b) <= 3
        assert int(ans) == {"+": int(a) + int(b), "-": int(a) - int(b),
                            "*": int(a) * int(b)}[op]
        n = len(ans)
        assert tin[0] == BOS and list(tin[1:n + 1]) == list(tout[:n]) and tout[n] == EOS
        assert np.all(tout[n + 1:] == PAD) and np.all(tin[n + 1:] == PAD)
    assert ops == {"+", "-", "*"}
    assert Vocab().decode(Vocab().encode("123*45=")) == "123*45="


def test_digit_counts_are_balanced():
    problems = ArithmeticStream(ArithmeticSpec("+", 1, 4), 4000, seed=1).problems_at(0)
    counts = np.bincount([len(str(a)) for a, _, _ in problems], minlength=5)[1:]
    assert np.all(np.abs(counts / 4000 - 0.25) < 0.03), counts


def test_long_multiplication_has_no_overflow():
    spec = ArithmeticSpec("*", 12, 12)
    (src, ans), = decode_rows(encode_batch(spec, Vocab(), [(999999999999, "*", 999999999999)]))
    assert ans == str(999999999999 ** 2) and len(ans) == spec.answer_len


def test_deterministic_and_resume_is_exact():
    a = ArithmeticStream(SPEC, 32, seed=5)
    first = [next(a) for _ in range(4)]
    b = ArithmeticStream(SPEC, 32, seed=5)
    for x, y in zip(first, (next(b) for _ in range(4))):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    state = a.get_state()
    after = next(a)
    c = ArithmeticStream(SPEC, 32, seed=5)
    c.set_state(state)
    resumed = next(c)
    for k in after:
        np.testing.assert_array_equal(resumed[k], after[k])
    assert not np.array_equal(next(ArithmeticStream(SPEC, 32, seed=6))["src"], first[0]["src"])
    with pytest.raises(ValueError, match="seed"):
        ArithmeticStream(SPEC, 32, seed=7).set_state(state)


def test_held_out_never_in_training_stream():
    spec = ArithmeticSpec("+*", 1, 2)  # a small space (2 * 100^2 problems): collisions likely
    test = held_out(spec, 500, seed=0)
    keys = {problem_key(*p) for p in test}
    assert len(keys) == len(test) == 500  # distinct, also up to commutation
    assert held_out(spec, 500, seed=0) == test  # deterministic
    assert held_out(spec, 200, seed=0) == test[:200]  # nested
    assert held_out(spec, 500, seed=1) != test
    stream = ArithmeticStream(spec, 512, seed=0, exclude=test)
    seen = set()
    for _ in range(40):
        seen |= {problem_key(*p) for p in stream.problems_at(stream.step)}
        stream.step += 1
    assert not seen & keys
    # The check has teeth: without the exclusion the same stream does hit the test set.
    free = ArithmeticStream(spec, 512, seed=0)
    assert {problem_key(*p) for p in free.problems_at(0)} & keys
    # No kind of problem is held out whole: all 1-digit additions are still trained on, but 20%.
    one_digit = {k for k in seen if k[0] == "+" and k[1] < 10 and k[2] < 10}
    assert len(one_digit) >= 0.8 * 55 - 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(ops="/"), "ops"), (dict(ops="++"), "ops"), (dict(ops=""), "ops"),
    (dict(max_digits=0), "max_digits"), (dict(max_digits=19), "max_digits"),
    (dict(min_digits=3, max_digits=2), "min_digits"),
])
def test_bad_spec_raises(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ArithmeticSpec(**kwargs)


def test_too_large_test_set_raises():
    with pytest.raises(ConfigError, match="test_size=100 is too large"):
        held_out(ArithmeticSpec("+", 1, 1), 100)
