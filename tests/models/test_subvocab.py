"""Sub-vocabulary: Qwen3's tokens on in-domain text, every text still encodable, a loadable tokenizer."""

import json

import numpy as np
import pytest
import transformers

from expint_jax.models.subvocab import SUBVOCAB_FILE, SubVocabulary, SubVocabularyError
from expint_jax.models.tokenizer import FIRST_ADDED_TOKEN_ID, QWEN3_ADDED_TOKENS, load_tokenizer

CORPUS = [
    "According to the Houkil Coast Sports League website (https://houkil-coast-sports-league.example.org/), "
    "what is the hometown of the director of Potraint Sailing Club?",
    '<tool_call>\n{"name": "visit", "arguments": {"url": "https://houkil-coast-sports-league.example.org/"}}\n'
    "</tool_call>",
    "Key facts:\n- Founded: 1944\n- Headquarters: Luwick\n- Director: Felix Cenailmann\n- Staff: 2,568",
    "Open the source: When search results show only a snippet, visit the most relevant result.",
]


@pytest.fixture(scope="module")
def base():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def vocab(base):
    return SubVocabulary.from_corpus(base, CORPUS * 3, max_tokens=600)


@pytest.fixture(scope="module")
def sub(vocab, base):
    return vocab.tokenizer(base)


def test_in_domain_text_gets_qwen3_tokens(vocab, sub, base):
    for text in CORPUS + ["Key facts:\n- Staff: 1944\n- Director: Potraint Sailing Club"]:
        ids = sub.encode(text)
        assert list(vocab.to_base(ids)) == base.encode(text)
        assert list(vocab.from_base(base.encode(text))) == ids


@pytest.mark.parametrize("text", ["zebra quokka xylophone", "naïve café — ünïcödé ✓ 🦜", "  \n\t  ", "Ω≈ç√∫"])
def test_any_text_still_encodes_and_decodes(sub, text):
    ids = sub.encode(text)
    assert max(ids) < len(sub) and sub.decode(ids) == text


def test_kept_set_bytes_merge_paths_and_added_tokens(vocab, base):
    assert len(vocab) < vocab.padded_size <= len(vocab) + 127 and vocab.padded_size % 128 == 0
    assert vocab.base_ids[-len(QWEN3_ADDED_TOKENS):] == tuple(range(FIRST_ADDED_TOKEN_ID,
                                                                    FIRST_ADDED_TOKEN_ID + len(QWEN3_ADDED_TOKENS)))
    model = json.loads(base.backend_tokenizer.to_str())["model"]
    kept = {token for token, i in model["vocab"].items() if i in set(vocab.base_ids)}
    assert sum(len(token) == 1 for token in kept) == 256
    for left, right in (m if isinstance(m, list) else m.split(" ", 1) for m in model["merges"]):
        if left + right in kept:  # the token's own merge: both parts are kept
            assert left in kept and right in kept


def test_special_tokens_and_chat_template(sub, base, vocab):
    assert sub.convert_ids_to_tokens(sub.eos_token_id) == "<|im_end|>" and sub.pad_token == "<|endoftext|>"
    messages = [{"role": "system", "content": CORPUS[3]}, {"role": "user", "content": CORPUS[0]}]
    rendered = sub.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == base.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = sub.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert list(vocab.to_base(ids)) == base.apply_chat_template(messages, tokenize=True,
                                                               add_generation_prompt=True)["input_ids"]


def test_save_and_load_round_trip(vocab, sub, tmp_path):
    vocab.save(tmp_path, sub)
    assert SubVocabulary.load(tmp_path) == vocab
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, transformers.PreTrainedTokenizerFast)
    assert all(loaded.encode(text) == sub.encode(text) for text in CORPUS)


def test_errors_name_what_is_wrong(vocab, tmp_path):
    with pytest.raises(SubVocabularyError, match="not in the sub-vocabulary: \\[151000\\]"):
        vocab.from_base([151000])
    with pytest.raises(SubVocabularyError, match="sub ids must be in"):
        vocab.to_base([len(vocab)])
    with pytest.raises(SubVocabularyError, match="no sub-vocabulary file"):
        SubVocabulary.load(tmp_path)
    (tmp_path / SUBVOCAB_FILE).write_text('{"base_ids": "x"}')
    with pytest.raises(SubVocabularyError, match="not a sub-vocabulary file"):
        SubVocabulary.load(tmp_path)
    with pytest.raises(SubVocabularyError, match="strictly increasing"):
        SubVocabulary((3, 2), 128)
    with pytest.raises(SubVocabularyError, match="max_tokens=100"):
        SubVocabulary.from_corpus(load_tokenizer(None), ["x"], max_tokens=100)
    assert np.array_equal(vocab.from_base(vocab.to_base([0, 5, 9])), [0, 5, 9])


def test_rare_tokens_are_left_out_above_a_minimum_count_and_rows_carry_over_by_qwen3_id(base, vocab):
    rare = SubVocabulary.from_corpus(base, CORPUS * 3 + ["Key facts: Key facts: Key facts:"], max_tokens=600,
                                     min_count=4)
    assert len(rare) < len(vocab)
    sub = rare.tokenizer(base)
    for text in CORPUS:  # still encodable, in more and smaller pieces where a token was rare
        assert sub.decode(sub.encode(text)) == text
    assert len(sub.encode(CORPUS[0])) > len(base.encode(CORPUS[0]))
    key = base.convert_tokens_to_ids("Key")
    assert key in rare.base_ids  # used 4 times
    for token in ("system", "assistant"):  # the chat scaffolding is kept whatever its count
        assert base.convert_tokens_to_ids(token) in rare.base_ids
    rows = np.arange(vocab.padded_size * 2, dtype=np.float32).reshape(vocab.padded_size, 2)
    carried = rare.carry_rows(rows, vocab, np.full((rare.padded_size, 2), -1.0, np.float32))
    np.testing.assert_array_equal(carried[rare.from_base([key])], rows[vocab.from_base([key])])
    assert (carried[len(rare):] == -1.0).all()  # padding rows stay fresh
    with pytest.raises(SubVocabularyError, match="min_count"):
        SubVocabulary.from_corpus(base, CORPUS, min_count=0)
    with pytest.raises(SubVocabularyError, match="do not fit"):
        rare.carry_rows(rows[:3], vocab, carried)
