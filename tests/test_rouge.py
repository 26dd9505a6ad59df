"""alpaca_nb.rouge gives exactly rouge-score's rougeL decisions and floats (the Alpaca filter)."""

from __future__ import annotations

import math
import random
from unittest.mock import patch

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from alpaca_nb import rouge
from alpaca_nb.data import load_alpaca_data, load_seed_tasks
from alpaca_nb.rouge import RougeLFilter, Similarity, rouge_l_fmeasure, rouge_tokenize

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def upstream_tokens(text: str) -> list[str]:
    return SCORER._tokenizer.tokenize(text)


def upstream_score(target: str, prediction: str) -> float:
    """Alpaca's generate_instruction.py: target = the new instruction, prediction = the pool member."""
    return rouge_scorer._score_lcs(upstream_tokens(target), upstream_tokens(prediction)).fmeasure


def upstream_scan(text: str, pool: list[str]) -> list[float]:
    return [upstream_score(text, member) for member in pool]


def upstream_is_near_duplicate(text: str, pool: list[str], threshold: float = 0.7) -> bool:
    return bool(pool) and max(upstream_scan(text, pool)) > threshold


def expected_top(text: str, pool: list[str], k: int) -> list[tuple[str, float]]:
    """The documented tie rule applied to the upstream scan: score desc, then first-added first."""
    first_index: dict[str, int] = {}
    for index, member in enumerate(pool):
        first_index.setdefault(member, index)
    scores = {member: upstream_score(text, member) for member in first_index}
    ranked = sorted(first_index, key=lambda member: (-scores[member], first_index[member]))
    return [(member, scores[member]) for member in ranked[:k]]


def filter_with(pool: list[str], threshold: float = 0.7) -> RougeLFilter:
    return RougeLFilter(pool, threshold=threshold)


# ---------------------------------------------------------------------------- hand-written cases

TOKENIZER_CASES = [
    "",
    "   ",
    "!!! ... ???",
    "café über",
    "naïve façade, résumé",
    "日本語のテキスト",
    "İstanbul and the Kelvin sign \u212a",
    "Call 555-0100 at 3.14pm, x2 or 2x",
    "Hello, hello HELLO hello!",
    "snake_case and kebab-case\tand\nnew\r\nlines",
    "Write a poem about the sea.",
    "a" * 500 + " b",
]


@pytest.mark.parametrize("text", TOKENIZER_CASES)
def test_tokenizer_matches_rouge_score(text):
    assert rouge_tokenize(text) == upstream_tokens(text)


FMEASURE_CASES = [
    ("", ""),
    ("", "write a poem"),
    ("write a poem", ""),
    ("!!!", "write a poem"),
    ("café über", "caf ber"),
    ("Write a poem about the sea.", "write a poem about the sea"),
    ("the the the the", "the"),
    ("a b c d e f", "f e d c b a"),
    ("give 3 examples of 2x growth", "give 3 examples of growth"),
    (" ".join(f"w{i % 7}" for i in range(150)), " ".join(f"w{i % 5}" for i in range(90))),
]


@pytest.mark.parametrize("target, prediction", FMEASURE_CASES)
def test_fmeasure_matches_rouge_score(target, prediction):
    ours = rouge_l_fmeasure(rouge_tokenize(target), rouge_tokenize(prediction))
    assert ours == upstream_score(target, prediction)
    assert type(ours) is float


def test_identical_text_scores_one_and_is_a_near_duplicate():
    pool = ["Write a poem about the sea.", "List three colours."]
    near = filter_with(pool)
    assert near.max_similarity("write a POEM about the sea") == 1.0 == upstream_score("write a POEM about the sea", pool[0])
    assert near.is_near_duplicate("Write a poem about the sea.")


def words(count: int, prefix: str = "w") -> list[str]:
    return [f"{prefix}{i}" for i in range(count)]


def test_score_exactly_threshold_is_not_a_near_duplicate():
    # m = n = 10 with LCS 7: p = r = 0.7 and the float F is exactly 0.7; the rule is "> 0.7".
    target = " ".join(words(10))
    member = " ".join(words(7) + words(3, "z"))
    assert upstream_score(target, member) == 0.7
    assert not filter_with([member]).is_near_duplicate(target)
    assert filter_with([member]).max_similarity(target) == 0.7
    assert filter_with([member], threshold=0.69).is_near_duplicate(target)


def test_rounding_above_threshold_is_a_near_duplicate_like_upstream():
    # Mathematically 2*7/(7+13) = 0.7, but rouge-score's float is 0.7000000000000001 > 0.7, so
    # upstream rejects; a pruning bound without a safety margin would wrongly accept.
    target = " ".join(words(7))
    member = " ".join(words(7) + words(6, "z"))
    assert upstream_score(target, member) > 0.7
    assert filter_with([member]).is_near_duplicate(target)
    assert filter_with([member]).max_similarity(target) == upstream_score(target, member)


def test_texts_without_tokens_score_zero_even_against_themselves():
    near = filter_with(["!!!", "café", "Write a poem."])
    for text in ["!!!", "", "über"]:
        assert near.max_similarity(text) == 0.0 == max(upstream_scan(text, ["!!!", "café", "Write a poem."]))
        assert not near.is_near_duplicate(text)
    assert near.most_similar("!!!", k=2) == Similarity(0.0, {"!!!": 0.0, "café": 0.0})


def test_empty_pool():
    near = RougeLFilter()
    assert len(near) == 0
    assert near.max_similarity("anything") == 0.0
    assert not near.is_near_duplicate("anything")
    assert near.most_similar("anything") == Similarity(0.0, {})
    assert near.add_if_novel("anything") and len(near) == 1


def test_duplicates_in_pool_count_in_len_but_appear_once_in_most_similar():
    near = filter_with(["Write a poem.", "Write a poem.", "write a poem", "List colours."])
    assert len(near) == 4
    top = near.most_similar("Write a poem!", k=10).most_similar
    assert list(top.items()) == [("Write a poem.", 1.0), ("write a poem", 1.0), ("List colours.", 0.0)]


def test_most_similar_is_ordered_with_exact_scores_and_ties_in_pool_order():
    pool = ["a b c", "x y z", "a b", "a b c d e", "b a c", "a b"]
    query = "a b c d"
    result = filter_with(pool).most_similar(query, k=4)
    assert list(result.most_similar.items()) == expected_top(query, pool, 4)
    assert result.max_similarity == max(upstream_scan(query, pool))


def test_most_similar_k_zero_still_gives_the_exact_max():
    pool = ["a b c", "a b"]
    assert filter_with(pool).most_similar("a b c", k=0) == Similarity(1.0, {})


def test_threshold_extremes():
    pool = ["alpha beta", "gamma"]
    assert filter_with(pool, threshold=-0.1).is_near_duplicate("delta")  # 0.0 > -0.1, as upstream
    assert not filter_with(pool, threshold=1.0).is_near_duplicate("alpha beta")  # 1.0 > 1.0 is False
    assert filter_with(pool, threshold=0.0).is_near_duplicate("beta delta")
    assert not filter_with(pool, threshold=0.0).is_near_duplicate("delta")
    with pytest.raises(ValueError, match="NaN"):
        RougeLFilter(pool, threshold=math.nan)


@pytest.mark.parametrize("length", [63, 64, 65, 130, 300])
@pytest.mark.parametrize("small_batch", [0, 1000])
def test_long_texts_across_machine_word_boundaries(length, small_batch):
    rng = random.Random(length)
    vocab = words(6)
    query = " ".join(rng.choice(vocab) for _ in range(length))
    pool = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 2 * length))) for _ in range(40)]
    pool.append(query.replace("w1", "w2", 3))
    with patch.object(rouge, "_SMALL_BATCH", small_batch):  # 0: numpy batch path; 1000: big ints
        near = filter_with(pool)
        scores = upstream_scan(query, pool)
        assert near.max_similarity(query) == max(scores)
        assert near.is_near_duplicate(query) == (max(scores) > 0.7)
        assert list(near.most_similar(query).most_similar.items()) == expected_top(query, pool, 10)


@pytest.mark.parametrize("small_batch", [0, 1000])
def test_carries_ripple_through_machine_words_without_matches(small_batch):
    # The middle 64-bit word of this query holds no "x": the bit-parallel addition for an "x"
    # must carry straight through it into the top word.
    query = " ".join(["x"] * 70 + ["y"] * 130 + ["x"] * 10)
    pool = [" ".join(["x"] * n) for n in (5, 40, 80, 120, 200)]
    pool += [" ".join(["x"] * 70 + ["z"] * 100 + ["x"] * 10), " ".join(["y"] * 100 + ["x"] * 90)]
    with patch.object(rouge, "_SMALL_BATCH", small_batch):
        near = filter_with(pool)
        assert near.max_similarity(query) == max(upstream_scan(query, pool))
        assert list(near.most_similar(query).most_similar.items()) == expected_top(query, pool, 10)


# ---------------------------------------------------------------------------- property tests

# A tiny vocabulary (with case, punctuation and non-ASCII noise) makes overlaps, ties and near
# duplicates frequent; the separators and variants exercise the tokenizer on the way.
WORDS = ["a", "b", "c", "d", "e", "The", "of", "x2", "A", "B!", "café", "--", "über", "3"]
SEPARATORS = [" ", ", ", "! ", " - ", "\n", "_"]


@st.composite
def texts(draw, max_words: int = 12) -> str:
    size = draw(st.one_of(st.integers(0, max_words), st.integers(0, 5 * max_words)))
    if draw(st.integers(0, 9)) == 0:  # long runs of one word: texts spanning several 64-bit words
        runs = draw(st.lists(st.tuples(st.sampled_from(WORDS), st.integers(1, 80)), max_size=4))
        parts = [word for word, run in runs for _ in range(run)]
        return " ".join(parts)
    parts = draw(st.lists(st.sampled_from(WORDS), min_size=size, max_size=size))
    separators = draw(st.lists(st.sampled_from(SEPARATORS), min_size=size, max_size=size))
    return "".join(word + separator for word, separator in zip(parts, separators))


THRESHOLDS = st.one_of(
    st.sampled_from([0.7, 0.0, 0.5, 1.0, -0.5, 2 / 3, 1 / 3, 0.7000000000000001, 0.6999999999999999]),
    st.floats(0.0, 1.0),
)
PROPERTY_SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@given(st.text())
@settings(max_examples=300, deadline=None)
def test_tokenizer_property(text):
    assert rouge_tokenize(text) == upstream_tokens(text)


@given(texts(), texts())
@settings(max_examples=300, deadline=None)
def test_fmeasure_property(target, prediction):
    assert rouge_l_fmeasure(rouge_tokenize(target), rouge_tokenize(prediction)) == upstream_score(target, prediction)


@pytest.mark.parametrize("small_batch", [0, 1000])
@given(pool=st.lists(texts(), max_size=40), queries=st.lists(texts(), min_size=1, max_size=6), threshold=THRESHOLDS)
@PROPERTY_SETTINGS
def test_queries_match_the_upstream_scan(small_batch, pool, queries, threshold):
    with patch.object(rouge, "_SMALL_BATCH", small_batch):
        near = filter_with(pool, threshold)
        for query in queries:
            scores = upstream_scan(query, pool)
            assert near.max_similarity(query) == max(scores, default=0.0)
            assert near.is_near_duplicate(query) == (bool(pool) and max(scores) > threshold)
            result = near.most_similar(query, k=5)
            assert list(result.most_similar.items()) == expected_top(query, pool, 5)
            assert result.max_similarity == max(scores, default=0.0)


@pytest.mark.parametrize("small_batch", [0, 1000])
@given(seeds=st.lists(texts(), max_size=10), stream=st.lists(texts(), max_size=40), threshold=THRESHOLDS)
@PROPERTY_SETTINGS
def test_add_if_novel_decisions_match_the_upstream_loop(small_batch, seeds, stream, threshold):
    with patch.object(rouge, "_SMALL_BATCH", small_batch):
        near = filter_with(seeds, threshold)
        pool = list(seeds)
        for text in stream:
            expected = not upstream_is_near_duplicate(text, pool, threshold)
            assert near.add_if_novel(text) == expected
            if expected:
                pool.append(text)
        assert len(near) == len(pool)


# ---------------------------------------------------------------------------- real instructions


def perturbed(text: str, rng: random.Random) -> str:
    """A light edit: drop, swap, duplicate or re-case one word."""
    parts = text.split()
    i = rng.randrange(len(parts))
    edit = rng.randrange(4)
    if edit == 0 and len(parts) > 1:
        del parts[i]
    elif edit == 1 and len(parts) > 1:
        j = (i + 1) % len(parts)
        parts[i], parts[j] = parts[j], parts[i]
    elif edit == 2:
        parts.insert(i, parts[i])
    else:
        parts[i] = parts[i].upper() if rng.random() < 0.5 else parts[i].lower()
    return " ".join(parts)


@pytest.fixture(scope="module")
def real_instructions() -> tuple[list[str], list[str]]:
    seeds = [task.instruction for task in load_seed_tasks()]
    alpaca = [r.instruction for asset in ("alpaca_gpt4_demo", "alpaca_sample") for r in load_alpaca_data(asset=asset)]
    assert len(seeds) == 175 and len(alpaca) == 1099
    return seeds, alpaca


def test_growing_a_pool_from_the_seeds_matches_upstream(real_instructions):
    """Alpaca's loop on real text: every decision and max score equal the rouge-score scan."""
    seeds, alpaca = real_instructions
    rng = random.Random(0)
    stream = []
    for text in alpaca:
        stream.append(text)
        if rng.random() < 0.25:  # a perturbed copy of something seen: mostly near duplicates
            stream.append(perturbed(rng.choice(seeds + stream), rng))
    near = RougeLFilter(seeds)
    pool_tokens = [upstream_tokens(text) for text in seeds]
    decisions = {True: 0, False: 0}
    for text in stream:
        tokens = upstream_tokens(text)
        scores = [rouge_scorer._score_lcs(tokens, member).fmeasure for member in pool_tokens]
        assert near.max_similarity(text) == max(scores), text
        novel = max(scores) <= 0.7
        assert near.add_if_novel(text) == novel, text
        decisions[novel] += 1
        if novel:
            pool_tokens.append(tokens)
    assert len(near) == len(pool_tokens)
    assert decisions[True] > 900 and decisions[False] > 150  # both kinds were really exercised


def test_most_similar_on_real_instructions(real_instructions):
    seeds, alpaca = real_instructions
    pool = seeds + alpaca[:400]
    near = RougeLFilter(pool)
    rng = random.Random(1)
    for text in rng.sample(alpaca, 15) + [perturbed(text, rng) for text in rng.sample(pool, 15)]:
        result = near.most_similar(text)
        assert list(result.most_similar.items()) == expected_top(text, pool, 10), text
