"""Integer arithmetic generated on the fly, as in the Goat study (Liu & Low 2023): problems like
``123*45=`` with answer ``5535``, for an encoder-decoder (source = the problem, target = the
answer) over a character vocabulary.

* ``ArithmeticSpec(ops='+*', min_digits=1, max_digits=3)``: each operand's digit count is drawn
  uniformly from ``[min_digits, max_digits]`` (so short and long numbers are equally common, as
  Goat balances them), then the number uniformly among the numbers of that many digits (1 digit
  means 0..9); the operator uniformly from ``ops`` (``+``, ``-``, ``*``).
* ``Vocab``: ids ``PAD=0, BOS=1, EOS=2`` then the characters ``0-9 + - * =``.
* ``held_out(spec, n, seed)``: ``n`` distinct test problems, a deterministic function of
  ``(spec, n, seed)`` (a larger ``n`` gives a superset). At most ``MAX_HELD_OUT_FRACTION`` of the
  problems of any (operator, digit count, digit count) cell are held out, so that no kind of
  problem (e.g. all 1-digit additions) disappears from training.
* ``ArithmeticStream``: training batches; the batch of step ``i`` is a function of
  ``(seed, i)`` only (a Philox stream keyed on both, as ``research.data.windows``), so
  ``get_state()`` = ``{'seed', 'step'}`` restores the exact order. Problems of the held-out set are
  rejected and redrawn, commuted ones too (``3+5`` is held out with ``5+3``): no test problem
  is ever trained on.

Batches are ``{'src': [B, S], 'tgt_in': [B, T], 'tgt_out': [B, T]}`` int32, PAD-padded on the
right: ``src`` = the problem's characters (``=`` included), ``tgt_in`` = BOS + answer,
``tgt_out`` = answer + EOS.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Iterable

import numpy as np

from research.core.config import ConfigError

PAD, BOS, EOS = 0, 1, 2
SPECIALS = ("<pad>", "<bos>", "<eos>")
CHARS = "0123456789+-*="
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
COMMUTATIVE = frozenset("+*")
MAX_DIGITS = 18  # operands are drawn as int64
MAX_HELD_OUT_FRACTION = 0.2

Problem = tuple[int, str, int]  # (a, op, b)


class Vocab:
    """Character vocabulary with PAD/BOS/EOS."""

    def __init__(self, chars: str = CHARS):
        self.chars = chars
        self.itos = list(SPECIALS) + list(chars)
        self.stoi = {c: i + len(SPECIALS) for i, c in enumerate(chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"Character {e.args[0]!r} is not in the arithmetic vocabulary "
                             f"{self.chars!r}.") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Characters up to the first EOS; PAD and BOS are skipped."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i >= len(SPECIALS):
                out.append(self.itos[i])
        return "".join(out)

    def to_json(self) -> dict:
        return {"kind": "arithmetic_char", "specials": list(SPECIALS), "chars": self.chars}


@dataclasses.dataclass(frozen=True)
class ArithmeticSpec:
    ops: str = "+"
    min_digits: int = 1
    max_digits: int = 3

    def __post_init__(self):
        if not self.ops or any(o not in OPS for o in self.ops) or len(set(self.ops)) != len(self.ops):
            raise ConfigError(f"config.data.ops={self.ops!r}: expected distinct operators from "
                              f"{''.join(OPS)!r}, e.g. '+' or '+*'.")
        for key in ("min_digits", "max_digits"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_DIGITS:
                raise ConfigError(f"config.data.{key}={v!r}: expected an integer in "
                                  f"[1, {MAX_DIGITS}].")
        if self.min_digits > self.max_digits:
            raise ConfigError(f"config.data.min_digits={self.min_digits} exceeds "
                              f"config.data.max_digits={self.max_digits}.")

    @property
    def src_len(self) -> int:
        """Longest problem text: two operands, the operator and '='."""
        return 2 * self.max_digits + 2

    @property
    def answer_len(self) -> int:
        n = {"+": self.max_digits + 1, "-": self.max_digits + 1, "*": 2 * self.max_digits}
        return max(n[o] for o in self.ops)

    @property
    def tgt_len(self) -> int:
        """Answer + EOS (targets) / BOS + answer (decoder inputs)."""
        return self.answer_len + 1

    def cell_size(self, digits: int) -> int:
        return 10 if digits == 1 else 9 * 10 ** (digits - 1)

    @property
    def space_size(self) -> int:
        """Number of distinct ordered problems."""
        n = sum(self.cell_size(d) for d in range(self.min_digits, self.max_digits + 1))
        return len(self.ops) * n * n

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def problem_key(a: int, op: str, b: int) -> tuple[str, int, int]:
    """Identity of a problem up to commuting the operands of + and *."""
    if op in COMMUTATIVE and b < a:
        a, b = b, a
    return op, int(a), int(b)


def answer(a: int, op: str, b: int) -> str:
    return str(OPS[op](int(a), int(b)))  # Python ints: no overflow for long products


def problem_text(a: int, op: str, b: int) -> tuple[str, str]:
    """``(source, answer)``, e.g. ``('123*45=', '5535')``."""
    return f"{int(a)}{op}{int(b)}=", answer(a, op, b)


def sample_problems(rng: np.random.Generator, spec: ArithmeticSpec, n: int):
    """``n`` random problems as arrays ``(a, op_index, b, digits_a, digits_b)``."""
    def operand():
        digits = rng.integers(spec.min_digits, spec.max_digits + 1, size=n)
        low = np.where(digits == 1, 0, 10 ** (digits - 1).astype(np.int64))
        return rng.integers(low, 10 ** digits.astype(np.int64)), digits
    a, da = operand()
    b, db = operand()
    ops = rng.integers(0, len(spec.ops), size=n)
    return a, ops, b, da, db


def held_out(spec: ArithmeticSpec, n: int, seed: int = 0) -> list[Problem]:
    """``n`` distinct problems (also distinct up to commutation) for evaluation; deterministic in
    ``(spec, n, seed)``, and the first ``n`` of a larger set."""
    limit = int(MAX_HELD_OUT_FRACTION * spec.space_size / 2)
    if n > limit:
        raise ConfigError(
            f"config.data.test_size={n} is too large for {spec.space_size} distinct problems "
            f"(ops={spec.ops!r}, digits {spec.min_digits}..{spec.max_digits}): at most {limit}; "
            "lower test_size or raise max_digits.")
    rng = np.random.Generator(np.random.Philox(key=[seed, 0x7E57]))  # not a training key
    out: list[Problem] = []
    seen: set = set()
    per_cell: dict = {}
    while len(out) < n:
        a, ops, b, da, db = sample_problems(rng, spec, 1024)  # fixed chunks: nested sets
        for ai, oi, bi, dai, dbi in zip(a.tolist(), ops.tolist(), b.tolist(), da.tolist(),
                                        db.tolist()):
            op = spec.ops[oi]
            key = problem_key(ai, op, bi)
            cell = (op,) + tuple(sorted((dai, dbi)) if op in COMMUTATIVE else (dai, dbi))
            cap = MAX_HELD_OUT_FRACTION * _distinct_in_cell(spec, op, dai, dbi)
            if key in seen or per_cell.get(cell, 0) + 1 > cap:
                continue
            seen.add(key)
            per_cell[cell] = per_cell.get(cell, 0) + 1
            out.append((ai, op, bi))
            if len(out) == n:
                break
    return out


def _distinct_in_cell(spec: ArithmeticSpec, op: str, da: int, db: int) -> int:
    """Distinct problems (up to commutation) whose operands have ``da`` and ``db`` digits."""
    ca, cb = spec.cell_size(da), spec.cell_size(db)
    if op in COMMUTATIVE and da == db:
        return ca * (ca + 1) // 2
    return ca * cb


def encode_batch(spec: ArithmeticSpec, vocab: Vocab, problems: list[Problem]) -> dict:
    b = len(problems)
    src = np.full((b, spec.src_len), PAD, np.int32)
    tgt_in = np.full((b, spec.tgt_len), PAD, np.int32)
    tgt_out = np.full((b, spec.tgt_len), PAD, np.int32)
    for i, (a, op, c) in enumerate(problems):
        s, ans = problem_text(a, op, c)
        s_ids, a_ids = vocab.encode(s), vocab.encode(ans)
        src[i, :len(s_ids)] = s_ids
        tgt_in[i, 0] = BOS
        tgt_in[i, 1:len(a_ids) + 1] = a_ids
        tgt_out[i, :len(a_ids)] = a_ids
        tgt_out[i, len(a_ids)] = EOS
    return {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out}


class ArithmeticStream:
    """Endless training batches that never contain a held-out problem (see the module doc)."""

    def __init__(self, spec: ArithmeticSpec, batch_size: int, seed: int,
                 exclude: Iterable[Problem] = (), step: int = 0, vocab: Vocab | None = None):
        self.spec, self.batch_size, self.seed, self.step = spec, batch_size, seed, step
        self.vocab = vocab or Vocab()
        self.exclude = {problem_key(*p) for p in exclude}

    def problems_at(self, step: int) -> list[Problem]:
        rng = np.random.Generator(np.random.Philox(key=[self.seed, step]))
        out: list[Problem] = []
        while len(out) < self.batch_size:
            a, ops, b, _, _ = sample_problems(rng, self.spec, self.batch_size)
            for ai, oi, bi in zip(a.tolist(), ops.tolist(), b.tolist()):
                op = self.spec.ops[oi]
                if problem_key(ai, op, bi) not in self.exclude:
                    out.append((ai, op, bi))
        return out[: self.batch_size]

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        return encode_batch(self.spec, self.vocab, self.problems_at(step))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        return {"seed": int(self.seed), "step": int(self.step)}

    def set_state(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"Data iterator state has seed {state['seed']}, config has {self.seed}")
        self.step = int(state["step"])
