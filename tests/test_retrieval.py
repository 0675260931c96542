"""BM25 against a hand-computed value, ranking, determinism and edge cases."""

import math

import pytest

from expint_jax.retrieval import BM25Index, tokenize


def test_tokenize_lowercases_and_splits_unicode_words():
    assert tokenize("Visit the Directory-page, then ANSWER: Zürich 2024!") == [
        "visit", "the", "directory", "page", "then", "answer", "zürich", "2024"]


def test_score_matches_hand_computation():
    docs = ["apple banana", "apple apple cherry", "durian"]
    index = BM25Index(docs, k1=1.2, b=0.75)
    n, mean_len = 3, (2 + 3 + 1) / 3
    idf = math.log(1 + (n - 2 + 0.5) / (2 + 0.5))
    expected = [idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * length / mean_len)) for tf, length in [(1, 2), (2, 3)]]
    scores = index.scores("Apple?")
    assert scores[0] == pytest.approx(expected[0]) and scores[1] == pytest.approx(expected[1])
    assert scores[2] == 0


def test_top_k_ranks_and_breaks_ties_by_order():
    index = BM25Index(["red fox", "blue fox", "red red fox", "green"])
    assert [i for i, _ in index.top_k("red", 5)] == [2, 0]
    assert [i for i, _ in index.top_k("fox", 2)] == [0, 1]  # equal length ties -> document order
    assert index.top_k("nothing matches", 3) == []


def test_empty_index_and_bad_parameters():
    assert BM25Index([]).top_k("a", 3) == []
    with pytest.raises(ValueError, match="k1"):
        BM25Index(["a"], b=2.0)
