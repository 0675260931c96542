"""Qwen3's thinking-off mode (``ChatFormat(enable_thinking=False)``) against the real Qwen3 chat
template (``QWEN3_CHAT_TEMPLATE`` in the offline tokenizer) and ``apply_chat_template(...,
enable_thinking=False)``.

The decision under test: the empty ``<think>\\n\\n</think>\\n\\n`` block is prompt, not output. It
closes every assistant header (the generation prompt and each rendered assistant turn), carries no
loss mask, and is never part of a turn's stored content; the trained tokens are exactly the content
the model sampled, as with thinking on."""

import numpy as np
import pytest

from expint_jax.models.chat import EMPTY_THINK, ChatFormat
from expint_jax.models.tokenizer import load_tokenizer
from expint_jax.records import Message

CALL = '<tool_call>\n{"name": "search", "arguments": {"query": "WebWalkerQA"}}\n</tool_call>'
RESULT = "<tool_response>\n1. WebWalkerQA — a benchmark (2025)\n</tool_response>"
AGENT = [  # what a thinking-off agent stores: the sampled content, no think block
    Message("system", "You are a web agent. Answer inside <answer></answer>."),
    Message("user", "When was WebWalkerQA released?"),
    Message("assistant", CALL),
    Message("user", RESULT),
    Message("assistant", "<answer>2025</answer>"),
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def chat(tok):
    return ChatFormat(tok, enable_thinking=False)


def template(tok, messages, **kwargs):
    return tok.apply_chat_template([m.to_json() for m in messages], enable_thinking=False, **kwargs)


@pytest.mark.parametrize("messages", [
    [Message("user", "Hi")],
    [Message("system", "Be brief."), Message("user", "2+2?")],
    AGENT[:2],
])
def test_the_first_turns_prompt_equals_the_template_with_thinking_off(tok, chat, messages):
    rendered = chat.render(messages, add_generation_prompt=True)
    assert rendered == template(tok, messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert chat.encode_prompt(messages).tolist() == template(tok, messages, add_generation_prompt=True)["input_ids"]
    # the thinking-on prompt is the plain header (the template's default)
    assert ChatFormat(tok).render(messages, add_generation_prompt=True) == tok.apply_chat_template(
        [m.to_json() for m in messages], tokenize=False, add_generation_prompt=True)


def test_a_finished_turn_renders_as_the_template_renders_the_last_assistant_turn(tok, chat):
    messages = AGENT[:2] + [Message("assistant", "<answer>2025</answer>")]
    assert chat.render(messages) == template(tok, messages, tokenize=False)
    assert chat.encode(messages).token_ids.tolist() == tok.encode(chat.render(messages))


def test_later_prompts_keep_the_empty_block_of_earlier_turns_which_the_template_drops(tok, chat):
    """Each turn was generated after the block, so the history keeps it (ChatFormat keeps earlier
    reasoning for the same reason); the template renders earlier turns without it."""
    messages = AGENT[:4]
    ours = chat.render(messages, add_generation_prompt=True)
    theirs = template(tok, messages, tokenize=False, add_generation_prompt=True)
    assert ours.count(EMPTY_THINK) == 2 and theirs.count(EMPTY_THINK) == 1
    assert ours.replace(f"assistant\n{EMPTY_THINK}{CALL}", f"assistant\n{CALL}") == theirs


def test_the_empty_block_is_prompt_not_trained_and_not_content(tok, chat):
    encoded = chat.encode(AGENT)
    plain = ChatFormat(tok).encode(AGENT)
    # The trained tokens are the sampled contents and their <|im_end|>, exactly as with thinking on.
    assert tok.decode(encoded.token_ids[encoded.loss_mask]) == f"{CALL}<|im_end|><answer>2025</answer><|im_end|>"
    assert encoded.token_ids[encoded.loss_mask].tolist() == plain.token_ids[plain.loss_mask].tolist()
    block = tok.encode(EMPTY_THINK)
    for k, (start, end) in enumerate(encoded.message_spans[i] for i in (2, 4)):
        header = encoded.token_ids[start:start + 3 + len(block)].tolist()
        assert header == [*chat.message_prefix_ids("assistant")] and header[3:] == block
        assert not encoded.loss_mask[start:start + len(header)].any()
        assert (encoded.turn_index[start:end - 1] == k).all()  # the block belongs to turn k's header


def test_each_turn_is_trained_right_after_the_prompt_it_was_generated_from(tok, chat):
    """The prompt of turn k (``encode_prompt`` of the messages before it) is a prefix of the whole
    conversation's ids, and turn k's trained tokens start right after it: what the model saw when
    it sampled the turn is the context the distillation views train it in."""
    encoded = chat.encode(AGENT)
    for k, index in enumerate(i for i, m in enumerate(AGENT) if m.role == "assistant"):
        prompt = chat.encode_prompt(AGENT[:index])
        np.testing.assert_array_equal(encoded.token_ids[:len(prompt)], prompt)
        trained = np.flatnonzero(encoded.loss_mask & (encoded.turn_index == k))
        assert trained[0] == len(prompt)
        content = encoded.token_ids[trained[:-1]].tolist()
        assert content == chat.text_ids(AGENT[index].content)  # the stored content, re-tokenized


def test_thinking_on_is_unchanged(tok):
    chat = ChatFormat(tok)
    assert chat.enable_thinking and chat.generation_prompt_ids() == (151644, 77091, 198)  # <|im_start|>assistant\n
    assert EMPTY_THINK not in chat.render(AGENT, add_generation_prompt=True)
