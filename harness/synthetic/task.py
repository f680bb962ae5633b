"""A seeded synthetic next-token task with short- and long-range patterns among noise (our own design: the article
publishes neither its generator nor its dataset sizes).

Vocabulary (``vocab`` tokens, 64 as in the article):

* ``0`` KEY marker, ``1`` RECALL marker, ``2``..``8`` MOTIF markers (token ``p`` announces a motif of period ``p``);
* ``9``..``vocab-1`` content tokens (55 of them at vocab 64), the only tokens that motifs, keys and noise are drawn
  from (uniformly, independently).

A sequence of model length L is L+1 tokens ``s[0..L]``; the model reads ``s[0..L-1]`` and predicts ``s[1..L]``:

* head: ``KEY k_1 .. k_K`` (K = :data:`KEY_LEN` = 4 random content tokens) at positions 0..K;
* body: segments until the body is full, each with probability :data:`P_MOTIF` a *motif segment*
  ``MOTIF_p m_1..m_p m_1..m_p m_1..m_p`` (period p uniform in 2..8, the p random content tokens m repeated
  :data:`REPEATS` = 3 times) or else a *noise segment* of 1..12 random content tokens (cut where the body ends); a
  motif that would not fit in the room left becomes noise filling it, so no motif is ever cut short;
* tail: ``RECALL k_1 .. k_K``, the key again, at the last K+1 positions (so L-2K-1 tokens after the key).

Predictable targets, the only tokens that the preceding tokens determine:

* *short-range* (category :data:`SHORT`): a motif token of the 2nd or 3rd repeat, equal to the token p positions back
  (p read from the segment's marker, at most 8 + 1 tokens back);
* *long-range* (category :data:`LONG`): the i-th token after RECALL, equal to the i-th key token at position i (the
  recall gap grows with L: 23 tokens at L=32, 247 at L=256).

Everything else is unpredictable (:data:`NOISE`): markers, keys, first motif periods and noise (where a segment
ends is random, so the token after the last repeat is not determined). :func:`oracle_predictions` applies these rules
to the tokens alone and is exact on every predictable position (tests/test_synthetic.py).

Accuracy (:mod:`harness.synthetic.train`): next-token argmax accuracy over the predictable positions, pooled over every
test sequence (``test_acc``; by category ``test_acc_short`` and ``test_acc_long``), and over all positions
(``test_acc_all``, which noise keeps far below 100%).

Batches are bucketed by length: ``size`` sequences split evenly over ``lengths`` (``size`` must be a multiple of
``batch_size * len(lengths)``), so a batch has one length. Train and test sets come from independent streams of one
seed (``numpy`` SeedSequence ``[seed, split]``): fixed for a seed, shared by every model at that seed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from harness.errors import HarnessError

GENERATOR_VERSION = 1  # bump when the generator changes what a seed gives (part of a run's set-up)
KEY, RECALL = 0, 1
PERIODS = tuple(range(2, 9))  # MOTIF_p is token p
CONTENT_START = 9
KEY_LEN = 4
REPEATS = 3
P_MOTIF = 0.5
NOISE_LEN = (1, 12)  # inclusive
NOISE, SHORT, LONG = 0, 1, 2  # the category of a target position
SPLITS = {"train": 0, "test": 1}
MIN_VOCAB = CONTENT_START + 2


def min_length() -> int:
    """The shortest model length: the head and the tail and one body token."""
    return 2 * (KEY_LEN + 1)


def generate_sequence(rng: np.random.Generator, length: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """One sequence ``s[0..length]`` and the category of each token as a target (:data:`NOISE`, :data:`SHORT`,
    :data:`LONG`; position 0 is never a target)."""
    content = lambda n: rng.integers(CONTENT_START, vocab, size=n)  # noqa: E731
    key = content(KEY_LEN)
    body_len = length + 1 - 2 * (KEY_LEN + 1)
    tokens, cats = [KEY, *key], [NOISE] * (KEY_LEN + 1)
    body_tokens, body_cats = [], []
    while (room := body_len - len(body_tokens)) > 0:
        period = int(rng.choice(PERIODS)) if rng.random() < P_MOTIF else 0
        if period and 1 + REPEATS * period <= room:
            body_tokens += [period, *np.tile(content(period), REPEATS)]
            body_cats += [NOISE] * (1 + period) + [SHORT] * (period * (REPEATS - 1))
        else:  # noise, also where a motif would not fit: a cut motif would end where its rule predicts more
            n = room if period else min(room, int(rng.integers(NOISE_LEN[0], NOISE_LEN[1] + 1)))
            body_tokens += list(content(n))
            body_cats += [NOISE] * n
    tokens += body_tokens + [RECALL, *key]
    cats += body_cats + [NOISE] + [LONG] * KEY_LEN
    return np.asarray(tokens, dtype=np.int64), np.asarray(cats, dtype=np.int8)


@dataclass(frozen=True)
class Bucket:
    """The sequences of one length: ``tokens`` (n, L+1), and ``cats`` (n, L), the categories of ``tokens[:, 1:]``."""

    length: int
    tokens: torch.Tensor
    cats: torch.Tensor


@dataclass(frozen=True)
class Dataset:
    split: str
    seed: int
    buckets: tuple[Bucket, ...]

    @property
    def size(self) -> int:
        return sum(len(b.tokens) for b in self.buckets)

    def sha256(self) -> str:
        """Of every token and category: the same seed and sizes give the same digest on every machine."""
        digest = hashlib.sha256()
        for bucket in self.buckets:
            digest.update(bucket.tokens.numpy().tobytes())
            digest.update(bucket.cats.numpy().tobytes())
        return digest.hexdigest()

    def stats(self) -> dict[str, object]:
        """Sequences, target positions and the share of each category, per length and in total."""
        def counts(cats: torch.Tensor) -> dict[str, object]:
            n = cats.numel()
            short, long = int((cats == SHORT).sum()), int((cats == LONG).sum())
            return {"targets": n, "short": short, "long": long, "predictable_share": round((short + long) / n, 4)}

        return {"sequences": self.size, **counts(torch.cat([b.cats.flatten() for b in self.buckets])),
                "per_length": {str(b.length): {"sequences": len(b.tokens), **counts(b.cats)} for b in self.buckets}}


def check_sizes(size: int, lengths: tuple[int, ...], batch_size: int, vocab: int, name: str = "size") -> None:
    """One line for sizes the bucketing cannot split evenly, a length too short for the head and tail, or a
    vocabulary without room for content tokens."""
    if vocab < MIN_VOCAB:
        raise HarnessError(f"vocab={vocab}: the task needs at least {MIN_VOCAB} tokens ({CONTENT_START} markers)")
    if not lengths or min(lengths) < min_length():
        raise HarnessError(f"lengths must be at least {min_length()} (key, recall and one body token), got "
                           f"{list(lengths)}")
    if len(set(lengths)) != len(lengths):
        raise HarnessError(f"lengths repeat a value: {list(lengths)}")
    per = batch_size * len(lengths)
    if batch_size < 1 or size < per or size % per:
        raise HarnessError(f"{name}={size} must be a positive multiple of batch_size x len(lengths) = {per} "
                           f"(equal batches of one length per bucket)")


def generate(seed: int, split: str, size: int, lengths: tuple[int, ...], batch_size: int, vocab: int) -> Dataset:
    """``size`` sequences of ``split`` (train or test) for ``seed``, evenly over ``lengths``."""
    check_sizes(size, lengths, batch_size, vocab, f"{split}_size")
    rng = np.random.default_rng([seed, SPLITS[split]])
    per_length = size // len(lengths)
    buckets = []
    for length in lengths:
        pairs = [generate_sequence(rng, length, vocab) for _ in range(per_length)]
        tokens = torch.from_numpy(np.stack([t for t, _ in pairs]))
        cats = torch.from_numpy(np.stack([c[1:] for _, c in pairs]))
        buckets.append(Bucket(length, tokens, cats))
    return Dataset(split, seed, tuple(buckets))


def batches(dataset: Dataset, batch_size: int, rng: np.random.Generator | None = None
            ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(inputs (B, L), targets (B, L), categories (B, L)) per batch: in order without ``rng``; with it, each
    bucket's sequences shuffled into batches and the batches of every bucket shuffled together."""
    out = []
    for bucket in dataset.buckets:
        order = rng.permutation(len(bucket.tokens)) if rng is not None else np.arange(len(bucket.tokens))
        for start in range(0, len(order), batch_size):
            index = torch.from_numpy(order[start:start + batch_size])
            tokens = bucket.tokens[index]
            out.append((tokens[:, :-1], tokens[:, 1:], bucket.cats[index]))
    if rng is not None:
        out = [out[i] for i in rng.permutation(len(out))]
    return out


def oracle_predictions(tokens: np.ndarray) -> np.ndarray:
    """For each target ``tokens[j]`` (j = 1..L) of one sequence, the token the rules above predict from
    ``tokens[:j]`` alone, or -1 where they predict nothing (an unpredictable position)."""
    out = np.full(len(tokens) - 1, -1, dtype=np.int64)
    marker = 0  # position of the latest marker before j (tokens[0] is KEY)
    for j in range(1, len(tokens)):
        if tokens[j - 1] < CONTENT_START:
            marker = j - 1
        kind, offset = int(tokens[marker]), j - marker - 1
        if kind == RECALL and offset < KEY_LEN:
            out[j - 1] = tokens[1 + offset]
        elif kind in PERIODS and kind <= offset < REPEATS * kind:
            out[j - 1] = tokens[j - kind]
    return out
