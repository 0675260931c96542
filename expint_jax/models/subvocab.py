"""A sub-vocabulary of the Qwen3 tokenizer: the same tokenization of a text domain with a small output layer.

A small model trained from scratch on one text domain (the SimWeb model organism) spends most of
its compute on a 151,936-word output layer whose rows it never uses. ``SubVocabulary`` keeps the
Qwen3 tokens a corpus uses and renumbers them densely, and ``SubVocabulary.tokenizer()`` is a real
Hugging Face fast tokenizer over them, saved with the checkpoint like any other tokenizer, so every
part of the system (the local engine, distillation views, export, a vLLM server) works unchanged.

Contract:
  * Kept: the 256 single-byte tokens (any text stays encodable), the chat template's scaffolding
    (role names, the empty think block), the ``max_tokens`` - 256 most frequent tokens of the
    corpus among those it uses at least ``min_count`` times (ties by Qwen3 id), every token on
    the merge path of a kept token (its two merge parts, recursively), and all 26 Qwen3 added
    tokens (the chat template's). Sub ids follow Qwen3's order: BPE tokens by rank, then the added
    tokens; ``base_ids[i]`` is the Qwen3 id of sub id ``i``.
  * The restricted tokenizer keeps Qwen3's merges whose parts and result are kept, in Qwen3's
    order. On any text whose Qwen3 tokens are all kept it gives exactly Qwen3's tokens (mapped to
    sub ids): BPE applies the lowest-ranked applicable merge at every step, and each merge Qwen3
    applies on such a word produces a token on a kept token's merge path. Other text is split into
    smaller kept pieces (down to bytes) and still decodes to itself.
  * ``to_base`` / ``from_base`` map id arrays between the two numberings (``from_base`` refuses
    ids that are not kept, naming them).
  * ``carry_rows(rows, source, fresh)``: an embedding for this vocabulary from one trained on
    ``source``: the rows of the tokens both keep, ``fresh``'s rows for the others.
  * ``save(directory)`` writes ``subvocab.json`` (the Qwen3 ids, in sub-id order) beside the
    tokenizer files; ``SubVocabulary.load(directory)`` reads it back.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tokenizers
import transformers

from expint_jax import storage
from expint_jax.models.tokenizer import FIRST_ADDED_TOKEN_ID, QWEN3_ADDED_TOKENS, save_tokenizer

SUBVOCAB_FILE = "subvocab.json"
# What Qwen3's chat template writes around messages (role lines, an empty think block).
CHAT_SCAFFOLD = "system\nuser\nassistant\ntool\n<think>\n\n</think>\n\n"
_BYTE_TOKENS = 256


class SubVocabularyError(ValueError):
    """A sub-vocabulary that cannot be built or used as asked; the message names what and where."""


@dataclasses.dataclass(frozen=True)
class SubVocabulary:
    base_ids: tuple[int, ...]  # Qwen3 id of each sub id, strictly increasing
    padded_size: int  # rows of the model's embedding (a multiple of 128, >= len(base_ids))

    def __post_init__(self) -> None:
        if any(b <= a for a, b in zip(self.base_ids, self.base_ids[1:])):
            raise SubVocabularyError("SubVocabulary.base_ids must be strictly increasing Qwen3 ids")
        if self.padded_size < len(self.base_ids):
            raise SubVocabularyError(f"SubVocabulary.padded_size={self.padded_size} is below its "
                                     f"{len(self.base_ids)} tokens")

    def __len__(self) -> int:
        return len(self.base_ids)

    @classmethod
    def from_corpus(cls, base: transformers.PreTrainedTokenizerFast, texts: Iterable[str], *,
                    max_tokens: int = 8192, min_count: int = 1, multiple: int = 128) -> SubVocabulary:
        """The kept tokens of ``texts`` under ``base`` (the Qwen3 tokenizer); see the module docstring.

        ``max_tokens`` bounds the kept tokens before the merge-path closure and the added tokens,
        so the result can hold a few more; ``padded_size`` rounds it up to ``multiple``.
        ``min_count`` > 1 leaves out tokens a small model would see too rarely to learn (a name's
        rare piece): their words are split into more frequent kept pieces instead."""
        if max_tokens <= _BYTE_TOKENS:
            raise SubVocabularyError(f"max_tokens={max_tokens}: must exceed the {_BYTE_TOKENS} byte tokens")
        if min_count < 1:
            raise SubVocabularyError(f"min_count={min_count}: must be >= 1")
        vocab, merges = _bpe_tables(base)
        by_id = {i: token for token, i in vocab.items()}
        counts: collections.Counter[int] = collections.Counter()
        for text in texts:
            counts.update(i for i in base.encode(text, add_special_tokens=False) if i < FIRST_ADDED_TOKEN_ID)
        kept = {i for token, i in vocab.items() if len(token) == 1}  # byte-level: one character per byte
        kept.update(i for i in base.encode(CHAT_SCAFFOLD, add_special_tokens=False) if i < FIRST_ADDED_TOKEN_ID)
        ranked = sorted((i for i in counts if counts[i] >= min_count), key=lambda i: (-counts[i], i))
        kept.update(ranked[:max_tokens - len(kept)])
        parents = {a + b: (a, b) for a, b in merges}
        stack = [by_id[i] for i in kept]
        while stack:  # close over merge paths
            for part in parents.get(stack.pop(), ()):
                if vocab[part] not in kept:
                    kept.add(vocab[part])
                    stack.append(part)
        ids = sorted(kept) + [FIRST_ADDED_TOKEN_ID + k for k in range(len(QWEN3_ADDED_TOKENS))]
        return cls(tuple(ids), -(-len(ids) // multiple) * multiple)

    def tokenizer(self, base: transformers.PreTrainedTokenizerFast) -> transformers.PreTrainedTokenizerFast:
        """A fast tokenizer over the kept tokens with ``base``'s normalizer, pre-tokenizer, decoder,
        added tokens and chat template (``base`` must be the Qwen3 tokenizer the ids refer to)."""
        spec = json.loads(base.backend_tokenizer.to_str())
        vocab, merges = _bpe_tables(base)
        by_id = {i: token for token, i in vocab.items()}
        added = {entry["id"]: entry for entry in spec["added_tokens"]}
        sub_vocab: dict[str, int] = {}
        sub_added = []
        for sub_id, base_id in enumerate(self.base_ids):
            if base_id in by_id:
                sub_vocab[by_id[base_id]] = sub_id
            elif base_id in added:
                sub_added.append({**added[base_id], "id": sub_id})
            else:
                raise SubVocabularyError(f"Qwen3 id {base_id} (sub id {sub_id}) is not a token of the base tokenizer")
        spec["model"]["vocab"] = sub_vocab
        spec["model"]["merges"] = [[a, b] for a, b in merges if a in sub_vocab and b in sub_vocab and a + b in sub_vocab]
        spec["added_tokens"] = sub_added
        backend = tokenizers.Tokenizer.from_str(json.dumps(spec))
        return transformers.Qwen2Tokenizer(
            tokenizer_object=backend, eos_token=base.eos_token, pad_token=base.pad_token, bos_token=None,
            unk_token=None, model_max_length=base.model_max_length, clean_up_tokenization_spaces=False,
            split_special_tokens=False, errors="replace", add_prefix_space=False, chat_template=base.chat_template)

    def carry_rows(self, rows: np.ndarray, source: SubVocabulary, fresh: np.ndarray) -> np.ndarray:
        """``fresh`` (this vocabulary's padded rows) with the rows of ``rows`` (``source``'s) copied
        in for every Qwen3 token both vocabularies keep."""
        if rows.shape[0] != source.padded_size or fresh.shape[0] != self.padded_size or rows.shape[1:] != fresh.shape[1:]:
            raise SubVocabularyError(f"carry_rows: rows {rows.shape} and fresh {fresh.shape} do not fit vocabularies "
                                     f"of {source.padded_size} and {self.padded_size} rows")
        shared = sorted(set(self.base_ids) & set(source.base_ids))
        out = np.array(fresh, copy=True)
        out[self.from_base(shared)] = rows[source.from_base(shared)]
        return out

    def to_base(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        table = np.asarray(self.base_ids, np.int64)
        ids = np.asarray(ids, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(table)):
            raise SubVocabularyError(f"sub ids must be in [0, {len(table)}), got {ids.min()}..{ids.max()}")
        return table[ids]

    def from_base(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        table = np.asarray(self.base_ids, np.int64)
        ids = np.asarray(ids, np.int64)
        found = np.clip(np.searchsorted(table, ids), 0, len(table) - 1)
        missing = ids[table[found] != ids]
        if missing.size:
            raise SubVocabularyError(f"Qwen3 ids not in the sub-vocabulary: {sorted(set(missing.tolist()))[:10]}")
        return found

    def save(self, directory: str | Path, tokenizer: transformers.PreTrainedTokenizerBase | None = None) -> None:
        """Writes ``subvocab.json`` (and ``tokenizer``'s files when given) into ``directory``."""
        directory = Path(directory)
        if tokenizer is not None:
            save_tokenizer(tokenizer, directory)
        storage.write_json(directory / SUBVOCAB_FILE, {"base": "Qwen3", "padded_size": self.padded_size,
                                                       "base_ids": list(self.base_ids)})

    @classmethod
    def load(cls, directory: str | Path) -> SubVocabulary:
        path = Path(directory) / SUBVOCAB_FILE
        try:
            data = storage.read_json(path)
            return cls(tuple(int(i) for i in data["base_ids"]), int(data["padded_size"]))
        except FileNotFoundError:
            raise SubVocabularyError(f"{path}: no sub-vocabulary file") from None
        except (KeyError, TypeError, ValueError) as e:
            raise SubVocabularyError(f"{path}: not a sub-vocabulary file ({e})") from None


def _bpe_tables(base: transformers.PreTrainedTokenizerFast) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = json.loads(base.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise SubVocabularyError(f"the base tokenizer's model is {model.get('type')!r}, not byte-level BPE")
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    return model["vocab"], merges  # type: ignore[return-value]

