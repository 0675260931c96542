"""Qwen3 chat format with the real offline Qwen3 tokenizer: ids, loss masks, turns, template parity.

Expected masks are computed independently of ``ChatFormat.encode``: the conversation text is
written out by hand, the assistant spans are located in it by string search, and the tokens of
the whole text (with character offsets) are marked when they fall inside a span.
"""


import numpy as np
import pytest
import tokenizers
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from expint_jax.models.chat import (
    ChatFormat,
    EncodedChat,
    ToolCall,
    ToolCallError,
    format_tool_call,
    format_tool_response,
    parse_answer,
    parse_tool_call,
    strip_think,
)
from expint_jax.models.tokenizer import load_tokenizer
from expint_jax.records import Message

IM_START, IM_END = 151644, 151645
SYSTEM, USER, ASSISTANT, NEWLINE = 8948, 872, 77091, 198  # "system", "user", "assistant", "\n"

THINK_AND_CALL = (
    "<think>\nThe page should list it. Search first.\n</think>\n\n"
    + '<tool_call>\n{"name": "search", "arguments": {"query": "WebWalkerQA 2025"}}\n</tool_call>'
)
TOOL_RESULT = "<tool_response>\n1. WebWalkerQA — a benchmark (2025)\n</tool_response>"
ANSWER = "<think>\nFound it.\n</think>\n\n<answer>2025</answer>"
AGENT_CONVERSATION = [
    Message("system", "You are a web agent. Answer inside <answer></answer>."),
    Message("user", "When was WebWalkerQA released?"),
    Message("assistant", THINK_AND_CALL),
    Message("user", TOOL_RESULT),
    Message("assistant", ANSWER),
]
HAND_RENDERED = (
    "<|im_start|>system\nYou are a web agent. Answer inside <answer></answer>.<|im_end|>\n"
    "<|im_start|>user\nWhen was WebWalkerQA released?<|im_end|>\n"
    f"<|im_start|>assistant\n{THINK_AND_CALL}<|im_end|>\n"
    f"<|im_start|>user\n{TOOL_RESULT}<|im_end|>\n"
    f"<|im_start|>assistant\n{ANSWER}<|im_end|>\n"
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def chat(tok):
    return ChatFormat(tok)


def expected_layout(tok, text, assistant_contents):
    """Token ids of ``text`` in one piece, and the mask / turn index from character spans."""
    encoding = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    trained, turns = [], []  # (start, end, turn) character spans
    position = 0
    for k, content in enumerate(assistant_contents):
        header = text.index("<|im_start|>assistant\n" + content + "<|im_end|>", position)
        content_start = header + len("<|im_start|>assistant\n")
        end = content_start + len(content) + len("<|im_end|>")
        trained.append((content_start, end))
        turns.append((header, end, k))
        position = end
    offsets = encoding["offset_mapping"]
    mask = [any(s <= a and b <= e for s, e in trained) for a, b in offsets]
    turn = [next((k for s, e, k in turns if s <= a and b <= e), -1) for a, b in offsets]
    return encoding["input_ids"], mask, turn


def test_agent_conversation_mask_and_turns(tok, chat):
    assert chat.render(AGENT_CONVERSATION) == HAND_RENDERED
    encoded = chat.encode(AGENT_CONVERSATION)
    ids, mask, turns = expected_layout(tok, HAND_RENDERED, [THINK_AND_CALL, ANSWER])
    assert encoded.token_ids.tolist() == ids
    assert encoded.loss_mask.tolist() == mask
    assert encoded.turn_index.tolist() == turns
    assert encoded.token_ids.dtype == np.int32 and encoded.turn_index.dtype == np.int32
    assert encoded.loss_mask.dtype == np.bool_
    # The trained tokens are exactly the assistant contents, each followed by <|im_end|>.
    trained = tok.decode(encoded.token_ids[encoded.loss_mask])
    assert trained == f"{THINK_AND_CALL}<|im_end|>{ANSWER}<|im_end|>"
    tags = tok.convert_tokens_to_ids(["<think>", "</think>", "<tool_call>", "</tool_call>"])
    assert set(tags) <= set(encoded.token_ids[encoded.loss_mask].tolist())  # single tokens, trained


def test_message_spans_cover_each_rendered_message(tok, chat):
    encoded = chat.encode(AGENT_CONVERSATION)
    assert encoded.message_spans[0][0] == 0 and encoded.message_spans[-1][1] == len(encoded)
    for (start, end), message, (next_start, _) in zip(
        encoded.message_spans, AGENT_CONVERSATION, [*encoded.message_spans[1:], (len(encoded), None)], strict=True
    ):
        assert end == next_start
        assert tok.decode(encoded.token_ids[start:end]) == chat.render([message])


def test_exact_ids_of_a_tiny_exchange(chat):
    encoded = chat.encode([Message("user", "Hi"), Message("assistant", "Hi")])
    hi = 13048
    user_turn = [IM_START, USER, NEWLINE, hi, IM_END, NEWLINE]
    assistant_turn = [IM_START, ASSISTANT, NEWLINE, hi, IM_END, NEWLINE]
    assert encoded.token_ids.tolist() == user_turn + assistant_turn
    assert encoded.loss_mask.tolist() == [False] * 9 + [True, True, False]
    assert encoded.turn_index.tolist() == [-1] * 6 + [0] * 5 + [-1]
    assert encoded.message_spans == ((0, 6), (6, 12))


def test_empty_assistant_turn_trains_only_its_im_end(chat):
    messages = [Message("user", "Say nothing."), Message("assistant", ""), Message("user", "Now say hi.")]
    encoded = chat.encode(messages)
    start, end = encoded.message_spans[1]
    assert encoded.token_ids[start:end].tolist() == [IM_START, ASSISTANT, NEWLINE, IM_END, NEWLINE]
    assert np.flatnonzero(encoded.loss_mask).tolist() == [start + 3]
    assert encoded.turn_index[start:end].tolist() == [0, 0, 0, 0, -1]


def test_conversation_ending_with_a_user_turn_and_unicode(tok, chat):
    contents = [
        "Réponds en français 🤖",
        "Ça dépend — 東京 или Москва? 👨‍👩‍👧\n\tمرحبا",
        "Weiter, bitte: Straße ẞ",
    ]
    messages = [Message("user", contents[0]), Message("assistant", contents[1]), Message("user", contents[2])]
    text = chat.render(messages)
    encoded = chat.encode(messages)
    ids, mask, turns = expected_layout(tok, text, [contents[1]])
    assert (encoded.token_ids.tolist(), encoded.loss_mask.tolist(), encoded.turn_index.tolist()) == (ids, mask, turns)
    assert not encoded.loss_mask[encoded.message_spans[2][0] :].any()
    assert tok.decode(encoded.token_ids) == text


def test_generation_prompt(tok, chat):
    messages = AGENT_CONVERSATION[:4]
    prompt = chat.encode_prompt(messages)
    assert prompt[-3:].tolist() == [IM_START, ASSISTANT, NEWLINE] == list(chat.generation_prompt_ids())
    assert prompt.tolist() == chat.encode(messages).token_ids.tolist() + [IM_START, ASSISTANT, NEWLINE]
    as_json = [m.to_json() for m in messages]
    assert prompt.tolist() == tok.apply_chat_template(as_json, tokenize=True, add_generation_prompt=True)["input_ids"]
    with_prompt = chat.encode(messages, add_generation_prompt=True)
    assert not with_prompt.loss_mask[-3:].any()
    assert with_prompt.turn_index[-3:].tolist() == [1, 1, 1]  # the header of the next (second) assistant turn
    assert len(with_prompt.message_spans) == len(messages)
    assert chat.render(messages, add_generation_prompt=True) == chat.render(messages) + "<|im_start|>assistant\n"


@pytest.mark.parametrize(
    "messages",
    [
        [Message("user", "Hi")],
        [Message("system", "Be brief."), Message("user", "2+2?")],
        [Message("system", "S"), Message("user", "a"), Message("assistant", "b"), Message("user", "c")],
        # tool responses after the last real query, assistant turns without <think>
        AGENT_CONVERSATION[:2] + [Message("assistant", THINK_AND_CALL.split("</think>\n\n")[1]), AGENT_CONVERSATION[3]],
        [Message("user", "x\n\n  y  "), Message("assistant", "ünïcödé 😀"), Message("user", "<b>html</b>")],
    ],
)
def test_render_equals_qwen3_template_for_plain_conversations(tok, chat, messages):
    as_json = [m.to_json() for m in messages]
    for prompt in (False, True):
        assert chat.render(messages, add_generation_prompt=prompt) == tok.apply_chat_template(
            as_json, tokenize=False, add_generation_prompt=prompt
        )


def test_render_keeps_earlier_reasoning_that_the_template_drops(tok, chat):
    messages = [Message("user", "a"), Message("assistant", "<think>\nr\n</think>\n\nb"), Message("user", "c")]
    ours = chat.render(messages)
    template = tok.apply_chat_template([m.to_json() for m in messages], tokenize=False)
    assert "<think>\nr\n</think>" in ours and "<think>" not in template
    assert ours.replace("<think>\nr\n</think>\n\n", "") == template


def test_segments_equal_whole_text_tokenization_unless_content_opens_with_a_line_break(tok, chat):
    plain = [Message("user", "  two spaces"), Message("assistant", " one space\n\n"), Message("user", "\tTab")]
    assert chat.encode(plain).token_ids.tolist() == tok.encode(chat.render(plain))
    opens_with_newline = [Message("user", "\nquestion")]
    ours = chat.encode(opens_with_newline).token_ids.tolist()
    whole = tok.encode(chat.render(opens_with_newline))
    assert ours[:4] == [IM_START, USER, NEWLINE, NEWLINE] and whole[:3] == [IM_START, USER, 271]  # 271 = "\n\n"
    assert tok.decode(ours) == tok.decode(whole)


def test_special_token_text_inside_content_keeps_masks_right(chat):
    quoted = "the page says <|im_end|> here"
    encoded = chat.encode([Message("user", quoted), Message("assistant", "ok")])
    start, end = encoded.message_spans[0]
    assert encoded.token_ids[start:end].tolist().count(IM_END) == 2  # quoted + real
    assert not encoded.loss_mask[start:end].any()
    assert encoded.loss_mask[encoded.message_spans[1][0] :].sum() == 2  # "ok" <|im_end|>


def test_eos_and_pad(chat):
    assert chat.eos_ids == (IM_END, 151643)
    assert chat.pad_id == 151643 and chat.pad_id in chat.eos_ids
    assert chat.message_prefix_ids("user") == (IM_START, USER, NEWLINE)
    assert chat.message_suffix_ids() == (IM_END, NEWLINE)


def test_bad_inputs_are_named(chat):
    with pytest.raises(TypeError, match=r"messages\[1\] is a dict"):
        chat.encode([Message("user", "a"), {"role": "assistant", "content": "b"}])
    with pytest.raises(ValueError, match="role 'tool'"):
        chat.message_prefix_ids("tool")
    with pytest.raises(ValueError, match="shapes"):
        EncodedChat(np.zeros(3, np.int32), np.zeros(2, bool), np.zeros(3, np.int32), ())


def test_rejects_a_tokenizer_without_qwen3_tokens():
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    other = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(ValueError, match="no single token for '<|im_start|>'"):
        ChatFormat(other)


# --- text protocol ---------------------------------------------------------------------------


def test_parse_tool_call_reads_the_first_block():
    text = THINK_AND_CALL + '\n<tool_call>\n{"name": "visit", "arguments": {}}\n</tool_call>'
    assert parse_tool_call(text) == ToolCall("search", {"query": "WebWalkerQA 2025"})
    assert parse_tool_call('<tool_call>{"name": "now"}</tool_call>') == ToolCall("now", {})


@pytest.mark.parametrize(
    ("text", "reason", "words"),
    [
        ("I will just answer.", "missing", "no <tool_call>"),
        ('<tool_call>\n{"name": "search", "arguments": {}}', "unclosed", "never closed"),
        ('<tool_call>\n{"name": "search", "arguments": {"q": }}\n</tool_call>', "invalid_json", "line 1, column"),
        ("<tool_call>\n" + "[" * 100_000 + "\n</tool_call>", "invalid_json", "not valid JSON"),
        ("<tool_call>" + "9" * 5000 + "</tool_call>", "invalid_json", "not valid JSON"),
        ('<tool_call>["search", {}]</tool_call>', "not_an_object", "got an array"),
        ('<tool_call>{"arguments": {}}</tool_call>', "missing_name", '"name"'),
        ('<tool_call>{"name": "  ", "arguments": {}}</tool_call>', "missing_name", '"name"'),
        ('<tool_call>{"name": 3}</tool_call>', "missing_name", '"name"'),
        ('<tool_call>{"name": "search", "arguments": "{\\"q\\": 1}"}</tool_call>', "bad_arguments", "got a string"),
        ('<tool_call>{"name": "search", "arguments": null}</tool_call>', "bad_arguments", "got null"),
    ],
)
def test_parse_tool_call_explains_malformed_calls(text, reason, words):
    error = parse_tool_call(text)
    assert isinstance(error, ToolCallError)
    assert error.reason == reason
    assert words in str(error)


@settings(max_examples=300, deadline=None)
@given(st.text(), st.text(), st.booleans(), st.booleans())
def test_parse_tool_call_never_raises(before, body, opened, closed):
    text = before + ("<tool_call>" if opened else "") + body + ("</tool_call>" if closed else "")
    result = parse_tool_call(text)
    assert isinstance(result, (ToolCall, ToolCallError))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1).filter(str.strip), st.dictionaries(st.text(), JSON_VALUES, max_size=4))
def test_format_then_parse_tool_call_round_trips(name, arguments):
    text = format_tool_call(name, arguments)
    assert text.startswith("<tool_call>\n{") and text.endswith("}\n</tool_call>")
    assert parse_tool_call("<think>x</think>\n" + text) == ToolCall(name, arguments)


def test_format_tool_call_matches_the_qwen3_template(tok):
    arguments = {"query": "東京", "top_k": 3}
    call = {"function": {"name": "search", "arguments": arguments}}
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "user", "content": "r"},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert f"<|im_start|>assistant\n{format_tool_call('search', arguments)}<|im_end|>" in rendered


def test_closing_tags_inside_arguments_do_not_end_the_call():
    arguments = {"code": "print('</tool_call>')", "html": "</answer></tool_response>"}
    text = format_tool_call("python", arguments)
    assert text.count("</tool_call>") == 1
    assert parse_tool_call(text) == ToolCall("python", arguments)


def test_format_tool_call_rejects_bad_input():
    with pytest.raises(ValueError, match="non-empty string"):
        format_tool_call(" ", {})
    with pytest.raises(TypeError, match="'search' are not JSON-serializable"):
        format_tool_call("search", {"when": object()})
    with pytest.raises(TypeError, match="must be a mapping"):
        format_tool_call("search", ["q"])


def test_format_tool_response_wraps_the_observation():
    assert format_tool_response("R") == TOOL_RESULT.replace("1. WebWalkerQA — a benchmark (2025)", "R")


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("<answer> Paris </answer>", "Paris"),
        ("<think>maybe <answer>Lyon</answer></think>\n<answer>Paris</answer>", "Paris"),
        ("<answer>first</answer> then <answer>\nsecond\n</answer>", "second"),
        ("<answer>unclosed", None),
        ("no answer at all", None),
        ("</answer> backwards <answer>", None),
        ("<answer></answer>", ""),
    ],
)
def test_parse_answer(text, answer):
    assert parse_answer(text) == answer


@pytest.mark.parametrize(
    ("text", "stripped"),
    [
        ("<think>\nplan\n</think>\n\n<answer>x</answer>", "<answer>x</answer>"),
        ("plan without an opening tag\n</think>\n\nreply", "reply"),
        ("reply <think>cut off by the token limit", "reply "),
        ("<think>a</think>one<think>b</think>two", "onetwo"),
        ("no reasoning here\n", "no reasoning here\n"),
        ("\nleading newline kept when nothing is removed", "\nleading newline kept when nothing is removed"),
    ],
)
def test_strip_think(text, stripped):
    assert strip_think(text) == stripped
