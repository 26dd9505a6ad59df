"""Exact, fast ROUGE-L near-duplicate filtering: rouge-score's ``rougeL`` decisions and floats.

Taught in chapter 2 (book/02_self_instruct.md). Alpaca's self-instruct loop
(stanford_alpaca ``generate_instruction.py``) rejects a generated instruction when its
``rougeL`` F-measure against any instruction already in the pool is above 0.7, scanning the
whole pool with rouge-score for every candidate (about a second per candidate at 50K).
:class:`RougeLFilter` gives the very same decisions and the very same floats, but computes an
LCS only for the few pool members that could possibly matter:

1. Tokens are interned to ids. A token that occurs c times in a text is stored as the c "keys"
   (token, 1) ... (token, c), so the multiset overlap of two texts is the number of keys they
   share, and one inverted index (key -> pool entries) counts the overlap of a query with every
   pool entry in a single ``np.bincount``.
2. An LCS is at most the multiset overlap, and F = 2pr/(p+r) is mathematically 2*lcs/(m+n), so
   2*overlap/(m+n) bounds F: entries whose bound cannot pass the threshold are never looked at.
3. Survivors get an exact LCS (bit-parallel, Hyyro / Allison-Dix: one big-integer addition per
   token, vectorised with numpy over many entries at once), best bound first, stopping at the
   first hit (decisions) or once no remaining bound can reach the best exact scores
   (branch and bound for ``max_similarity`` / ``most_similar``).
4. Scores are always computed with rouge-score's own floating-point formula, and every pruning
   bound keeps a safety margin, so rounding can never prune a true hit.

Prefix filtering (as in set-similarity joins) was measured too: at 50K entries, scanning the
postings of the query's rarest keys and probing the rest cost more (0.42 ms per query) than one
``np.bincount`` over all of its postings plus the bound (0.25 ms), so the simpler route is kept.

Identical token lists are stored once (an "entry") with every distinct text that produced them.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["RougeLFilter", "Similarity", "rouge_l_fmeasure", "rouge_tokenize"]

# rouge-score lowercases, turns every run of non-[a-z0-9] characters into a space and keeps the
# non-empty pieces: exactly the maximal runs of [a-z0-9] in the lowercased text.
_TOKEN = re.compile(r"[a-z0-9]+")

# Pruning compares mathematical bounds with floats that carry a few ulps (~1e-16) of rounding;
# this margin is many orders larger, so a bound never discards an entry whose float could qualify.
_MARGIN = 1e-9

# Below this many entries a per-entry big-int LCS beats numpy's fixed cost per call.
_SMALL_BATCH = 24
_WORD_BITS = 64
_WORD_MASK = (1 << _WORD_BITS) - 1


def rouge_tokenize(text: str) -> list[str]:
    """Tokenize exactly like rouge-score's default tokenizer (no stemmer)."""
    return _TOKEN.findall(text.lower())


def rouge_l_fmeasure(target_tokens: Sequence[str], prediction_tokens: Sequence[str]) -> float:
    """rouge-score's ``_score_lcs(target_tokens, prediction_tokens).fmeasure``, the same float."""
    if not target_tokens or not prediction_tokens:
        return 0.0
    lcs = _lcs_length(_match_masks(target_tokens), len(target_tokens), prediction_tokens)
    return _fmeasure(lcs, len(target_tokens), len(prediction_tokens))


def _fmeasure(lcs: int, target_len: int, prediction_len: int) -> float:
    """``_score_lcs`` + ``scoring.fmeasure`` of rouge-score, operation for operation."""
    precision = lcs / prediction_len
    recall = lcs / target_len
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def _fmeasures(lcs: np.ndarray, target_len: int, prediction_lens: np.ndarray) -> np.ndarray:
    """Vectorised :func:`_fmeasure`: the same IEEE operations in the same order."""
    precision = lcs / prediction_lens
    recall = lcs / target_len
    total = precision + recall
    with np.errstate(invalid="ignore"):  # 0/0 where lcs == 0; np.where picks 0.0 there
        scores = 2 * precision * recall / total
    return np.where(total > 0, scores, 0.0)


def _match_masks(target: Sequence) -> dict:
    """Bit i of ``masks[token]`` is set where ``target[i] == token``."""
    masks: dict = {}
    for position, token in enumerate(target):
        masks[token] = masks.get(token, 0) | (1 << position)
    return masks


def _lcs_length(masks: dict, target_len: int, prediction: Sequence) -> int:
    """LCS length by Hyyro's bit-parallel recurrence; the zero bits of v count the LCS."""
    full = (1 << target_len) - 1
    v = full
    for token in prediction:
        u = v & masks.get(token, 0)
        v = (v + u) | (v - u)
    return target_len - (v & full).bit_count()


@dataclass(frozen=True)
class Similarity:
    """How close a text is to a pool, with rouge-score's exact ``rougeL`` F-measures.

    ``most_similar`` maps up to k distinct pool texts to their scores, highest first. Tie rule:
    equal scores keep pool order (the text added first comes first); upstream's
    ``np.argsort(scores)[-10:][::-1]`` leaves tie order to numpy's sort. A text added twice
    appears once. When fewer than k texts share a token with the query, the earliest-added
    texts scoring 0.0 fill the rest, as upstream's top 10 does.
    """

    max_similarity: float
    most_similar: dict[str, float]


class _Buffer:
    """A growable numpy array: amortised O(1) append, zero-copy view."""

    __slots__ = ("data", "size")

    def __init__(self, dtype: type) -> None:
        self.data = np.empty(4, dtype=dtype)
        self.size = 0

    def _reserve(self, size: int) -> None:
        while size > len(self.data):
            self.data = np.concatenate([self.data, np.empty_like(self.data)])

    def append(self, value: int) -> None:
        self._reserve(self.size + 1)
        self.data[self.size] = value
        self.size += 1

    def extend(self, values: Sequence[int]) -> None:
        self._reserve(self.size + len(values))
        self.data[self.size : self.size + len(values)] = values
        self.size += len(values)

    def view(self) -> np.ndarray:
        return self.data[: self.size]


class _Query:
    """A text about to be compared with the pool: its tokens as pool token ids."""

    def __init__(self, tokens: list[str], vocab: dict[str, int]) -> None:
        self.length = len(tokens)
        # A token the pool has never seen gets -1: it matches nothing but counts in the length.
        self.ids = [vocab.get(token, -1) for token in tokens]
        self.key_counts = {tid: count for tid, count in Counter(self.ids).items() if tid >= 0}
        self.masks = _match_masks(self.ids)


class RougeLFilter:
    """A pool of texts answering rouge-score ``rougeL`` questions exactly, without a full scan.

    ``is_near_duplicate(text)`` is exactly ``max(F(text, p) for p in pool) > threshold`` where F
    is rouge-score's ``_score_lcs(tokens(text), tokens(p)).fmeasure`` (the new text is the
    target, the pool member the prediction), as in Alpaca's ``generate_instruction.py``.
    ``len(filter)`` counts every text added, repeated texts included.
    """

    def __init__(self, existing: Iterable[str] = (), threshold: float = 0.7) -> None:
        if math.isnan(threshold):
            raise ValueError("threshold must be a number, not NaN")
        self.threshold = float(threshold)
        self._size = 0
        self._vocab: dict[str, int] = {}
        # _postings[token id][c - 1]: the entries holding that token at least c times, ascending.
        self._postings: list[list[_Buffer]] = []
        self._entry_of: dict[tuple[str, ...], int] = {}
        self._entry_ids: list[list[int]] = []
        self._entry_texts: list[list[tuple[int, str]]] = []  # (first insertion index, text)
        self._texts: dict[str, int] = {}  # distinct text -> its entry, first added first
        self._lengths = _Buffer(np.int64)
        self._offsets = _Buffer(np.int64)
        self._flat_ids = _Buffer(np.int32)  # every entry's token ids, back to back
        for text in existing:
            self.add(text)

    def __len__(self) -> int:
        return self._size

    # ------------------------------------------------------------------ public API

    def add(self, text: str) -> None:
        """Add ``text`` to the pool unconditionally."""
        self._add(text, rouge_tokenize(text))

    def add_if_novel(self, text: str) -> bool:
        """Add ``text`` and return True, unless it is a near duplicate of the pool (False)."""
        tokens = rouge_tokenize(text)
        if self._is_near_duplicate(tokens):
            return False
        self._add(text, tokens)
        return True

    def is_near_duplicate(self, text: str) -> bool:
        """Exactly: the rougeL F of ``text`` against some pool member is > ``threshold``."""
        return self._is_near_duplicate(rouge_tokenize(text))

    def max_similarity(self, text: str) -> float:
        """The exact max rougeL F of ``text`` over the pool (0.0 for an empty pool)."""
        return self.most_similar(text, k=1).max_similarity

    def most_similar(self, text: str, k: int = 10) -> Similarity:
        """The exact max score and the k most similar distinct texts (tie rule: see Similarity)."""
        if not self._size:
            return Similarity(0.0, {})
        scored = self._top_entries(_Query(rouge_tokenize(text), self._vocab), max(k, 1))
        ranked = sorted(
            (-score, index, pool_text) for entry, score in scored for index, pool_text in self._entry_texts[entry]
        )
        top = {pool_text: -negative for negative, _, pool_text in ranked[: max(k, 0)]}
        if len(top) < k:
            top.update(self._zero_fill({entry for entry, _ in scored}, k - len(top)))
        return Similarity(-ranked[0][0] if ranked else 0.0, top)

    # ------------------------------------------------------------------ the index

    def _add(self, text: str, tokens: list[str]) -> None:
        entry = self._entry_of.get(tuple(tokens))
        if entry is None:
            entry = self._new_entry(tokens)
        if text not in self._texts:
            self._texts[text] = entry
            self._entry_texts[entry].append((self._size, text))
        self._size += 1

    def _new_entry(self, tokens: list[str]) -> int:
        entry = len(self._entry_ids)
        ids = [self._intern(token) for token in tokens]
        for tid, count in Counter(ids).items():
            levels = self._postings[tid]
            while len(levels) < count:
                levels.append(_Buffer(np.int32))
            for level in levels[:count]:
                level.append(entry)
        self._entry_of[tuple(tokens)] = entry
        self._entry_ids.append(ids)
        self._entry_texts.append([])
        self._offsets.append(self._flat_ids.size)
        self._lengths.append(len(ids))
        self._flat_ids.extend(ids)
        return entry

    def _intern(self, token: str) -> int:
        tid = self._vocab.get(token)
        if tid is None:
            tid = self._vocab[token] = len(self._vocab)
            self._postings.append([])
        return tid

    def _overlaps(self, query: _Query) -> np.ndarray:
        """Multiset overlap of the query with every entry: an upper bound on their LCS."""
        postings = [
            level.view() for tid, count in query.key_counts.items() for level in self._postings[tid][:count]
        ]
        if not postings:
            return np.zeros(len(self._entry_ids), dtype=np.int64)
        return np.bincount(np.concatenate(postings), minlength=len(self._entry_ids))

    # ------------------------------------------------------------------ threshold decisions

    def _is_near_duplicate(self, tokens: list[str]) -> bool:
        threshold = self.threshold
        if not self._size:
            return False
        if threshold < 0:
            return True  # every score is >= 0.0
        if not tokens:
            return False  # every score is exactly 0.0
        if tuple(tokens) in self._entry_of:
            return 1.0 > threshold  # an identical token list scores 1.0, the maximum
        query = _Query(tokens, self._vocab)
        return self._any_above(query, self._threshold_candidates(query, threshold), threshold)

    def _threshold_candidates(self, query: _Query, threshold: float) -> np.ndarray:
        """Entries whose bound 2*overlap/(m+n) lets them exceed ``threshold``, best bound first."""
        m = query.length
        counts = self._overlaps(query)
        lengths = self._lengths.view()
        # overlap 0 means lcs 0 and F = 0.0, which never exceeds a threshold >= 0.
        passes = (2 * counts > (threshold - _MARGIN) * (m + lengths)) & (counts > 0)
        candidates = np.flatnonzero(passes)
        bounds = counts[candidates] / (m + lengths[candidates])
        return candidates[np.argsort(-bounds, kind="stable")]

    def _any_above(self, query: _Query, candidates: np.ndarray, threshold: float) -> bool:
        """Exact scores in growing batches, most likely hits first; stop at the first hit."""
        start, batch = 0, 4
        while start < len(candidates):
            if (self._scores(query, candidates[start : start + batch]) > threshold).any():
                return True
            start, batch = start + batch, batch * 8
        return False

    # ------------------------------------------------------------------ ranking

    def _top_entries(self, query: _Query, k: int) -> list[tuple[int, float]]:
        """Entries with exact scores, enough to rank the top-k distinct texts (branch and bound).

        Entries are scored best upper bound first, in growing batches; once the k-th best exact
        score beats every unscored bound (by the safety margin), nothing else can enter the top k
        or tie with it. Each batch is picked with argpartition: no sort of the whole pool.
        """
        m = query.length
        if m == 0:
            return []
        counts = self._overlaps(query)
        bounds = 2 * counts / (m + self._lengths.view())  # overlap 0: F = 0.0, see _zero_fill
        scored: list[tuple[int, float]] = []
        best: list[float] = []  # the k best scores so far, one per distinct text, descending
        batch = 16
        while True:
            if len(best) >= k:
                open_entries = np.flatnonzero(bounds >= best[k - 1] - _MARGIN)
            else:
                open_entries = np.flatnonzero(bounds > 0)
            if not len(open_entries):
                return scored
            if len(open_entries) > batch:
                open_entries = open_entries[np.argpartition(-bounds[open_entries], batch)[:batch]]
            bounds[open_entries] = -1.0  # scored now: never selected again
            for entry, score in zip(open_entries.tolist(), self._scores(query, open_entries).tolist()):
                scored.append((entry, score))
                best.extend([score] * len(self._entry_texts[entry]))
            best = sorted(best, reverse=True)[:k]
            batch *= 4

    def _zero_fill(self, scored_entries: set[int], wanted: int) -> dict[str, float]:
        """The earliest-added texts that share no token with the query, hence score 0.0."""
        zeros: dict[str, float] = {}
        for pool_text, entry in self._texts.items():  # dicts keep insertion order
            if len(zeros) == wanted:
                break
            if entry not in scored_entries:  # every scored entry shares a token: F > 0
                zeros[pool_text] = 0.0
        return zeros

    # ------------------------------------------------------------------ exact scores

    def _scores(self, query: _Query, entries: np.ndarray) -> np.ndarray:
        """rouge-score's F of the query (target) against each entry (prediction)."""
        lengths = self._lengths.view()[entries]
        if len(entries) <= _SMALL_BATCH:
            lcs = np.array(
                [_lcs_length(query.masks, query.length, self._entry_ids[e]) for e in entries.tolist()],
                dtype=np.int64,
            )
        else:
            lcs = self._lcs_batch(query, entries, lengths)
        return _fmeasures(lcs, query.length, lengths)

    def _lcs_batch(self, query: _Query, entries: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Hyyro's bit-parallel LCS for many entries at once, one token position per step.

        The query is the bit pattern (``words`` uint64 words per entry). Entries run longest
        first, so the entries still active at a step are a prefix of the batch.
        """
        m = query.length
        words = -(-m // _WORD_BITS)
        order = np.argsort(-lengths, kind="stable")
        offsets = self._offsets.view()[entries][order]
        # row_of[token id] -> row of masks; row 0 (tokens absent from the query) matches nothing.
        row_of = np.zeros(len(self._vocab), dtype=np.int64)
        masks = np.zeros((len(query.masks) + 1, words), dtype=np.uint64)
        for row, (tid, mask) in enumerate(query.masks.items(), start=1):
            if tid >= 0:
                row_of[tid] = row
                masks[row] = [(mask >> (_WORD_BITS * w)) & _WORD_MASK for w in range(words)]
        # Bits above m start as ones too: carries only move upward, so they never reach bits < m.
        v = np.full((len(entries), words), _WORD_MASK, dtype=np.uint64)
        flat = self._flat_ids.view()
        sorted_lengths = lengths[order]
        active_per_step = np.searchsorted(-sorted_lengths, -np.arange(int(sorted_lengths[0])), side="left")
        for step, active in enumerate(active_per_step.tolist()):
            current = v[:active]
            u = current & masks[row_of[flat[offsets[:active] + step]]]
            v[:active] = _add_words(current, u) | (current & ~u)  # v - u == v & ~u as u is in v
        ones = np.bitwise_count(v[:, :-1]).sum(axis=1, dtype=np.int64)
        top_bits = np.uint64((1 << (m - _WORD_BITS * (words - 1))) - 1)
        ones += np.bitwise_count(v[:, -1] & top_bits)
        lcs = np.empty(len(entries), dtype=np.int64)
        lcs[order] = m - ones
        return lcs


def _add_words(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise unsigned addition of multi-word numbers (little-endian words, top carry dropped)."""
    total = a + b  # uint64 wraps around; the carry is recovered below
    if a.shape[1] == 1:
        return total
    carry = total[:, 0] < a[:, 0]
    for w in range(1, a.shape[1]):
        plain = total[:, w]
        with_carry = plain + carry
        carry = (plain < a[:, w]) | (with_carry < plain)
        total[:, w] = with_carry
    return total
