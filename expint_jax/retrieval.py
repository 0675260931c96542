"""Okapi BM25 over short documents: SimWeb's search index and the ``bm25`` experience selector.

Deterministic: ties in score are broken by document order, so the same corpus and query always
give the same ranking. Tokenization is lowercase Unicode words (letters and digits), which is
enough for lexical matching of questions against pages or lessons.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def tokenize(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class BM25Index:
    """An immutable BM25 index; ``k1`` and ``b`` are the usual Okapi parameters."""

    def __init__(self, documents: Sequence[str], k1: float = 1.5, b: float = 0.75):
        if k1 < 0 or not 0 <= b <= 1:
            raise ValueError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        self.k1, self.b = k1, b
        self._size = len(documents)
        # Inverted index: term -> (document indices, term frequencies), so a query touches only
        # the documents that contain its terms.
        postings: dict[str, tuple[list[int], list[int]]] = {}
        lengths = np.zeros(self._size, dtype=np.float64)
        for i, document in enumerate(documents):
            counts = Counter(tokenize(document))
            lengths[i] = sum(counts.values())
            for term, tf in counts.items():
                docs, tfs = postings.setdefault(term, ([], []))
                docs.append(i)
                tfs.append(tf)
        self._postings = {t: (np.array(d, np.int64), np.array(f, np.float64)) for t, (d, f) in postings.items()}
        mean_length = float(lengths.mean()) if self._size else 0.0
        self._norm = k1 * (1 - b + b * lengths / max(mean_length, 1e-9))
        # The "+1" variant keeps idf positive for terms present in most documents.
        n = self._size
        self._idf = {t: math.log(1 + (n - len(d) + 0.5) / (len(d) + 0.5)) for t, (d, _) in self._postings.items()}

    def __len__(self) -> int:
        return self._size

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for ``query``, shape [num_documents]."""
        out = np.zeros(self._size, dtype=np.float64)
        for term in set(tokenize(query)):
            if term not in self._postings:
                continue
            docs, tf = self._postings[term]
            out[docs] += self._idf[term] * tf * (self.k1 + 1) / (tf + self._norm[docs])
        return out

    def top_k(self, query: str, k: int) -> list[tuple[int, float]]:
        """The ``k`` best (document index, score) pairs with a positive score, best first."""
        scores = self.scores(query)
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return [(i, float(scores[i])) for i in order[:k] if scores[i] > 0]
