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
        self._term_counts = [Counter(tokenize(d)) for d in documents]
        self._lengths = np.array([sum(c.values()) for c in self._term_counts], dtype=np.float64)
        self._mean_length = float(self._lengths.mean()) if len(documents) else 0.0
        document_frequency: Counter[str] = Counter()
        for counts in self._term_counts:
            document_frequency.update(counts.keys())
        n = len(documents)
        # The "+1" variant keeps idf positive for terms present in most documents.
        self._idf = {t: math.log(1 + (n - df + 0.5) / (df + 0.5)) for t, df in document_frequency.items()}

    def __len__(self) -> int:
        return len(self._term_counts)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for ``query``, shape [num_documents]."""
        out = np.zeros(len(self), dtype=np.float64)
        if not len(self):
            return out
        norm = self.k1 * (1 - self.b + self.b * self._lengths / max(self._mean_length, 1e-9))
        for term in set(tokenize(query)):
            idf = self._idf.get(term)
            if idf is None:
                continue
            tf = np.array([c.get(term, 0) for c in self._term_counts], dtype=np.float64)
            out += idf * tf * (self.k1 + 1) / (tf + norm)
        return out

    def top_k(self, query: str, k: int) -> list[tuple[int, float]]:
        """The ``k`` best (document index, score) pairs with a positive score, best first."""
        scores = self.scores(query)
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return [(i, float(scores[i])) for i in order[:k] if scores[i] > 0]
