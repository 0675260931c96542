"""Stop strings, exact at the byte level, on device and on the host.

Design (why not token patterns): a stop string can be one special token (``<tool_response>`` in
Qwen3), span several tokens, or begin or end inside a token, and the same text has many
tokenizations. So matching is done on the generated *bytes*, never on token ids:

  * ``TokenBytes`` holds the UTF-8 bytes of every token id (byte-level BPE vocabularies map each
    token to bytes exactly; added tokens such as ``<tool_response>`` are their literal text).
  * ``StopTable`` is an Aho-Corasick automaton over bytes for a set of stop strings, folded over
    the vocabulary: ``transitions[state, token]`` is the automaton state after reading the
    token's bytes, or ``MATCHED`` (-1) when some stop string is completed inside those bytes. The
    decode loop keeps one state per row and does one gather per step, so a row stops at exactly
    the first token that completes any stop string, whatever the tokenization.
  * ``cut_at_stop`` then runs on the host over the bytes generated up to that token: the text is
    cut at the start of the earliest stop string occurrence. ``token_ids`` keep the tokens that
    lie wholly before the cut; when a stop string begins inside a token, that token is dropped
    and only its bytes before the stop string remain in the text (so ``text`` can extend past
    the decoded ``token_ids`` by part of one token; for stop strings that start at a token
    boundary, including every special-token stop, text and tokens agree exactly).

Matching is on raw bytes: the stop strings are UTF-8 encoded as given (no normalization).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from expint_jax.models.tokenizer import byte_to_unicode

MATCHED = -1
MIN_STATES = 32


class TokenBytes:
    """The bytes of every token id of a vocabulary (ids past the tokenizer's own are empty)."""

    def __init__(self, table: Sequence[bytes]):
        if not table:
            raise ValueError("TokenBytes needs at least one token")
        self.table: tuple[bytes, ...] = tuple(table)
        self._stop_tables: dict[tuple[str, ...], StopTable] = {}

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: int) -> TokenBytes:
        """From a Hugging Face fast tokenizer with a byte-level decoder (GPT-2, Qwen, Llama-3 style)."""
        decoder = type(tokenizer.backend_tokenizer.decoder).__name__
        if decoder != "ByteLevel":
            raise ValueError(
                f"TokenBytes.from_tokenizer needs a byte-level BPE tokenizer; {type(tokenizer).__name__} "
                f"has a {decoder} decoder, whose tokens do not map to bytes one by one"
            )
        known = len(tokenizer)
        if known > vocab_size:
            raise ValueError(f"tokenizer has {known} tokens but the model vocabulary is only {vocab_size}")
        from_char = {char: byte for byte, char in byte_to_unicode().items()}
        added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        pieces = tokenizer.convert_ids_to_tokens(list(range(known)))
        table = []
        for i, piece in enumerate(pieces):
            if i in added:
                table.append(added[i].encode("utf-8"))
            elif piece is None:
                table.append(b"")
            else:
                try:
                    table.append(bytes(from_char[c] for c in piece))
                except KeyError as e:
                    raise ValueError(f"token {i} ({piece!r}) holds {e.args[0]!r}, not a byte-level character") from None
        table += [b""] * (vocab_size - known)
        return cls(table)

    def __len__(self) -> int:
        return len(self.table)

    def join(self, ids: Sequence[int]) -> bytes:
        return b"".join(self.table[i] for i in ids)

    def text(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (invalid UTF-8, e.g. a cut multi-byte character, becomes U+FFFD)."""
        return self.join(ids).decode("utf-8", errors="replace")

    def stop_table(self, stops: Sequence[str]) -> StopTable:
        """The (memoized) device table for ``stops``."""
        key = tuple(stops)
        if key not in self._stop_tables:
            self._stop_tables[key] = StopTable.build(key, self)
        return self._stop_tables[key]


def _automaton(patterns: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Aho-Corasick as a full DFA: ``delta[state, byte]`` and ``accepts[state]`` (state 0 = root)."""
    children: list[dict[int, int]] = [{}]
    accepts = [False]
    for pattern in patterns:
        state = 0
        for byte in pattern:
            if byte not in children[state]:
                children.append({})
                accepts.append(False)
                children[state][byte] = len(children) - 1
            state = children[state][byte]
        accepts[state] = True
    delta = np.zeros((len(children), 256), np.int32)
    fail = [0] * len(children)
    queue = collections.deque()
    for byte, child in children[0].items():
        delta[0, byte] = child
        queue.append(child)
    while queue:  # breadth first: a state's failure target is complete before the state is
        state = queue.popleft()
        accepts[state] = accepts[state] or accepts[fail[state]]
        delta[state] = delta[fail[state]]
        for byte, child in children[state].items():
            fail[child] = delta[fail[state], byte]
            delta[state, byte] = child
            queue.append(child)
    return delta, np.asarray(accepts)


@dataclasses.dataclass(frozen=True, eq=False)
class StopTable:
    """``transitions[state, token]``: next automaton state, or ``MATCHED`` when a stop completes.

    The state count is padded to a power of two, at least ``MIN_STATES``, so that typical stop
    sets (the agent's two tags need 28 states) share one compiled decode loop; with no stop
    strings the table is all zeros (never matches).
    """

    stops: tuple[str, ...]
    transitions: np.ndarray  # [num_states, vocab] int32

    @classmethod
    def build(cls, stops: Sequence[str], token_bytes: TokenBytes) -> StopTable:
        stops = tuple(stops)
        for i, stop in enumerate(stops):
            if not isinstance(stop, str) or not stop:
                raise ValueError(f"stop[{i}] = {stop!r}: stop strings must be non-empty str")
        delta, accepts = _automaton([s.encode("utf-8") for s in stops])
        num_states = delta.shape[0]
        lengths = np.fromiter((len(b) for b in token_bytes.table), np.int64, len(token_bytes))
        width = max(int(lengths.max()), 1)
        matrix = np.zeros((len(token_bytes), width), np.uint8)
        for i, b in enumerate(token_bytes.table):
            matrix[i, : len(b)] = np.frombuffer(b, np.uint8)
        # Feed every token's bytes from every state at once, dropping tokens as they run out.
        states = np.broadcast_to(np.arange(num_states, dtype=np.int32)[:, None], (num_states, len(lengths))).copy()
        matched = np.zeros(states.shape, bool)
        by_length = np.argsort(-lengths, kind="stable")
        for column in range(width):
            live = by_length[: int(np.count_nonzero(lengths > column))]
            nxt = delta[states[:, live], matrix[live, column][None, :]]
            matched[:, live] |= accepts[nxt]
            states[:, live] = nxt
        table = np.where(matched, MATCHED, states).astype(np.int32)
        padded = max(1 << (num_states - 1).bit_length(), MIN_STATES)
        table = np.concatenate([table, np.zeros((padded - num_states, table.shape[1]), np.int32)])
        return cls(stops=stops, transitions=table)

    @classmethod
    def never(cls, vocab_size: int) -> StopTable:
        """The table of an empty stop set, for generation without ``TokenBytes``."""
        return cls(stops=(), transitions=np.zeros((MIN_STATES, vocab_size), np.int32))


@dataclasses.dataclass(frozen=True)
class Cut:
    """Where generated tokens end once stop strings are honoured."""

    num_tokens: int  # tokens wholly before the cut
    text: str
    stop_string: str | None  # the stop string found, None when the text was not cut


def find_stop(data: bytes, stops: Sequence[str]) -> tuple[int, str] | None:
    """(byte offset, stop) of the earliest-starting stop string occurrence; ties: the shortest."""
    best: tuple[int, int, str] | None = None
    for stop in stops:
        at = data.find(stop.encode("utf-8"))
        if at >= 0 and (best is None or (at, len(stop)) < best[:2]):
            best = (at, len(stop), stop)
    return None if best is None else (best[0], best[2])


def cut_at_stop(ids: Sequence[int], token_bytes: TokenBytes, stops: Sequence[str]) -> Cut:
    """Cuts generated ``ids`` (without eos) before the first stop string; see the module docstring."""
    pieces = [token_bytes.table[i] for i in ids]
    data = b"".join(pieces)
    found = find_stop(data, stops)
    if found is None:
        return Cut(num_tokens=len(pieces), text=data.decode("utf-8", errors="replace"), stop_string=None)
    offset, stop = found
    ends = np.cumsum([len(p) for p in pieces]) if pieces else np.zeros(0, np.int64)
    whole = int(np.searchsorted(ends, offset, side="right"))
    return Cut(num_tokens=whole, text=data[:offset].decode("utf-8", errors="replace"), stop_string=stop)

