"""The JAX sampler: parity with transformers' greedy generate, log-probs, sampling, stops, sharding.

Two tiny models: a random Hugging Face checkpoint (vocabulary 512) for parity with
``transformers``, and a random Qwen3 with the real vocabulary (151,936) so that the offline Qwen3
tokenizer's bytes and special tokens drive the stop-string tests. Shapes are kept identical
across tests so that each model compiles its prefill and decode only once per strategy.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from expint_jax.models.config import tiny
from expint_jax.models.hf import load_checkpoint
from expint_jax.models.qwen3 import Qwen3
from expint_jax.models.tokenizer import load_tokenizer
from expint_jax.parallel.mesh import MeshConfig, make_mesh
from expint_jax.records import SamplingParams
from expint_jax.llm.sampler import (
    GenerationCounters,
    Greedy,
    Layout,
    Penalties,
    PrefixCache,
    Temperature,
    TokenBytes,
    TopK,
    TopKTopP,
    TopP,
    bucket,
    cut_at_stop,
    from_params,
    generate,
    penalties_from_params,
)
from expint_jax.llm.sampler.prefix_cache import PAGE_TOKENS
from expint_jax.llm.sampler.sampling import TOP_P_CANDIDATES, first_argmax, token_log_probs, top_p_filter
from expint_jax.llm.sampler.stops import MATCHED, StopTable
from tests.models.hf_fixtures import make_checkpoint

PROMPT_LENGTHS = (7, 2, 13, 4)
NEW_TOKENS = 10
SAMPLED = TopK(50, temperature=0.9)


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    directory = tmp_path_factory.mktemp("checkpoint")
    hf_model = make_checkpoint(directory)
    graphdef, state = nnx.split(load_checkpoint(directory))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 512, n) for n in PROMPT_LENGTHS]
    return dict(directory=directory, hf=hf_model, graphdef=graphdef, state=state, prompts=prompts)


@pytest.fixture(scope="module")
def greedy(parity):
    return generate(parity["graphdef"], parity["state"], parity["prompts"], strategy=Greedy(),
                    max_new_tokens=NEW_TOKENS)


def _sampled(parity, **kwargs):
    kwargs = dict(strategy=SAMPLED, max_new_tokens=NEW_TOKENS, seed=7) | kwargs
    prompts = kwargs.pop("prompts", parity["prompts"])
    return generate(parity["graphdef"], parity["state"], prompts, **kwargs)


def test_greedy_left_padded_batch_equals_transformers_generate_per_prompt(parity, greedy):
    for prompt, ours in zip(parity["prompts"], greedy):
        with torch.no_grad():
            reference = parity["hf"].generate(
                torch.as_tensor(prompt[None]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                do_sample=False, eos_token_id=None, pad_token_id=0,
            )
        assert list(ours.token_ids) == reference[0, len(prompt):].tolist()
        assert ours.finish_reason == "length" and ours.num_generated == NEW_TOKENS
        assert ours.sampling_logprobs == (0.0,) * NEW_TOKENS  # greedy samples with certainty


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_logprobs_equal_a_teacher_forced_forward(parity):
    model = nnx.merge(parity["graphdef"], parity["state"])
    outputs = _sampled(parity)
    full = [np.concatenate([p, o.token_ids]) for p, o in zip(parity["prompts"], outputs)]
    width = max(len(f) for f in full)
    ids = np.stack([np.pad(f, (0, width - len(f))) for f in full])  # right padding, masked out
    segments = (np.arange(width)[None] < np.array([len(f) for f in full])[:, None]).astype(np.int32)
    positions = np.broadcast_to(np.arange(width), ids.shape)
    batch_logits = np.asarray(model(jnp.asarray(ids), jnp.asarray(positions), segment_ids=jnp.asarray(segments)))
    for prompt, out, logits in zip(parity["prompts"], outputs, batch_logits):
        steps = np.arange(len(prompt) - 1, len(prompt) + len(out.token_ids) - 1)  # logits at t predict token t + 1
        model_lp = _log_softmax(logits[steps])
        np.testing.assert_allclose(out.logprobs, model_lp[np.arange(len(steps)), out.token_ids], atol=1e-5, rtol=0)
        scaled = logits[steps] / SAMPLED.temperature
        kth = np.sort(scaled, axis=-1)[:, -SAMPLED.k][:, None]
        sampling_lp = _log_softmax(np.where(scaled >= kth, scaled, -np.inf))
        np.testing.assert_allclose(out.sampling_logprobs, sampling_lp[np.arange(len(steps)), out.token_ids],
                                   atol=1e-5, rtol=0)


def _top_k_reference(logits, k):
    """numpy top-k ids, log-probs and tail log mass of softmax(logits [n, V])."""
    logp = _log_softmax(logits.astype(np.float64))
    ids = np.argsort(-logp, axis=-1, kind="stable")[:, :k]
    top = np.take_along_axis(logp, ids, -1)
    rest = logp.copy()
    np.put_along_axis(rest, ids, -np.inf, -1)
    peak = rest.max(-1, keepdims=True)
    return ids, top, (peak + np.log(np.exp(rest - peak).sum(-1, keepdims=True)))[:, 0]


def test_teacher_signal_equals_a_teacher_forced_forward_at_every_token_and_one_past(parity):
    model = nnx.merge(parity["graphdef"], parity["state"])
    eos = _sampled(parity)[0].token_ids[4]  # some rows stop early, at different steps
    outputs = _sampled(parity, top_logprobs=6, eos_ids=(eos,), max_new_tokens=[10, 3, 10, 7])
    plain = _sampled(parity, eos_ids=(eos,), max_new_tokens=[10, 3, 10, 7])
    for out, same in zip(outputs, plain):  # recording changes nothing else
        assert (out.token_ids, out.finish_reason, out.num_generated) == (same.token_ids, same.finish_reason,
                                                                         same.num_generated)
        np.testing.assert_allclose(out.logprobs, same.logprobs, atol=1e-6)
        assert same.top_logprobs is None
    for prompt, out in zip(parity["prompts"], outputs):
        signal = out.top_logprobs
        n = out.num_generated
        assert len(signal.token_ids) == n and signal.num_positions == n + 1 and signal.k == 6
        assert tuple(signal.token_ids[:len(out.token_ids)]) == out.token_ids
        if out.finish_reason == "eos":
            assert signal.token_ids[-1] == eos
        full = np.concatenate([prompt, signal.token_ids])
        logits = np.asarray(model(jnp.asarray(full[None]), jnp.arange(len(full))[None]))[0]
        ids, top, tail = _top_k_reference(logits[len(prompt) - 1:], 6)  # n + 1 positions: every token and one past
        np.testing.assert_array_equal(signal.top_ids, ids)
        np.testing.assert_allclose(signal.top_logprobs, top, atol=1e-5, rtol=0)
        np.testing.assert_allclose(signal.tail_logmass, tail, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="top_logprobs must be an int in"):
        _sampled(parity, top_logprobs=512)


def test_same_seed_same_output_and_rows_do_not_depend_on_their_batch(parity):
    first, again, other = _sampled(parity), _sampled(parity), _sampled(parity, seed=8)
    assert first == again
    assert [o.token_ids for o in other] != [o.token_ids for o in first]
    # Row 2 alone (the rest of the batch inactive), and the batch in reverse order.
    alone = _sampled(parity, prompts=[parity["prompts"][2]], row_ids=[2], batch_size=len(PROMPT_LENGTHS))
    assert alone[0].token_ids == first[2].token_ids
    reverse = _sampled(parity, prompts=parity["prompts"][::-1], row_ids=[3, 2, 1, 0])
    assert [o.token_ids for o in reverse[::-1]] == [o.token_ids for o in first]


def test_rows_finish_independently_at_their_own_eos(parity, greedy):
    eos = greedy[0].token_ids[3]
    out = generate(parity["graphdef"], parity["state"], parity["prompts"], strategy=Greedy(),
                   max_new_tokens=NEW_TOKENS, eos_ids=(eos, 10_000))
    for free, stopped in zip(greedy, out):
        hits = [i for i, t in enumerate(free.token_ids) if t == eos]
        if hits:  # stops right at the eos, which is left out; everything before is unchanged
            assert stopped.finish_reason == "eos" and stopped.num_generated == hits[0] + 1
            assert stopped.token_ids == free.token_ids[: hits[0]]
            assert stopped.logprobs == pytest.approx(free.logprobs[: hits[0]], abs=1e-6)
        else:
            assert stopped.finish_reason == "length" and stopped.token_ids == free.token_ids
    assert len({o.num_generated for o in out}) > 1


def test_per_row_token_limits(parity, greedy):
    limits = [3, 10, 1, 6]
    out = generate(parity["graphdef"], parity["state"], parity["prompts"], strategy=Greedy(), max_new_tokens=limits)
    for free, limited, limit in zip(greedy, out, limits):
        assert limited.finish_reason == "length" and limited.token_ids == free.token_ids[:limit]


def test_sharded_generation_equals_single_device(parity):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    graphdef, state = nnx.split(load_checkpoint(parity["directory"], mesh=mesh))
    with jax.set_mesh(mesh):
        sharded = generate(graphdef, state, parity["prompts"], strategy=SAMPLED, max_new_tokens=NEW_TOKENS, seed=7)
    for single, multi in zip(_sampled(parity), sharded):
        assert multi.token_ids == single.token_ids
        np.testing.assert_allclose(multi.logprobs, single.logprobs, atol=1e-5, rtol=0)


def test_generate_rejects_bad_input(parity):
    run = dict(strategy=Greedy(), max_new_tokens=4)
    with pytest.raises(ValueError, match=r"prompt 1 holds token ids outside \[0, 512\)"):
        generate(parity["graphdef"], parity["state"], [[1, 2], [3, 512]], **run)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate(parity["graphdef"], parity["state"], [[]], **run)
    with pytest.raises(ValueError, match="stop strings need token_bytes"):
        generate(parity["graphdef"], parity["state"], [[1]], stops=("x",), **run)
    with pytest.raises(ValueError, match="seed: 2 values for 1 rows"):
        generate(parity["graphdef"], parity["state"], [[1]], seed=[1, 2], **run)


def _same_generations(got, want):
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5, rtol=0)


def test_prefix_cache_reuses_earlier_turns_and_equals_prefilling_from_scratch(parity):
    graphdef, state = parity["graphdef"], parity["state"]
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 512, n) for n in (40, 21, 50, 33)]
    cache, counters = PrefixCache(parity_config(parity), "float32", max_tokens=4096), GenerationCounters()
    run = dict(strategy=SAMPLED, max_new_tokens=6, seed=5)
    first = generate(graphdef, state, prompts, **run, prefix_cache=cache, counters=counters)
    _same_generations(first, generate(graphdef, state, prompts, **run))
    assert counters.reused_tokens == 0 and len(cache) == len(prompts)

    tool = [rng.integers(0, 512, n) for n in (30, 5, 1, 4)]
    second = [np.concatenate([p, g.token_ids, t]) for p, g, t in zip(prompts, first, tool)]
    second[1] = np.concatenate([prompts[1], first[1].token_ids[:-2], tool[1]])  # as after a stop-string cut
    second[3] = np.concatenate([prompts[3][:20], tool[3]])  # diverges early: reused up to the divergence
    run |= dict(seed=6, row_ids=[3, 1, 0, 2])
    _same_generations(generate(graphdef, state, second, **run, prefix_cache=cache, counters=counters),
                      generate(graphdef, state, second, **run))
    # Each row reuses its common prefix with what the first call stored: the prompt and the generated
    # tokens that entered the cache (all but the last), when that covers at least one whole page.
    stored = [np.concatenate([p, g.token_ids[:-1]]) for p, g in zip(prompts, first)]
    common = [min(_common(s, q), len(q) - 1) for s, q in zip(stored, second)]
    expected = [n if n >= PAGE_TOKENS else 0 for n in common]
    assert counters.reused_tokens == sum(expected) and all(expected)
    layout = Layout.of(np.asarray([len(q) for q in second]), np.asarray(expected), 6)
    assert counters.prefill_slots == 4 * bucket(50) + 4 * layout.chunk_width
    assert layout.chunk_width < layout.width  # only what follows the reused prefixes was prefilled


def _common(a, b):
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


def parity_config(parity):
    return nnx.merge(parity["graphdef"], parity["state"]).config


def test_layout_pads_widths_to_buckets_and_the_cache_to_width_plus_output():
    layout = Layout.of(np.asarray([100, 30]), np.asarray([90, 0]), 20)
    assert (layout.width, layout.chunk_width, layout.max_new, layout.num_slots) == (128, 32, 24, 152)
    assert Layout.of(np.asarray([100]), np.asarray([0]), 20).chunk_width == 128


# --- sampling strategies ---------------------------------------------------------------------

LOGITS = np.array([2.0, 1.5, 1.5, 1.0, 0.2, -0.5, -1.0, -3.0, 0.9, 0.0], np.float32)


def _draws(strategy, draws=20_000):
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (draws, LOGITS.size))
    keys = jax.random.split(jax.random.key(0), draws)
    return np.asarray(strategy(logits, keys))  # eager: primitives compile once for all strategies


def _expected(allowed, temperature):
    weights = np.where(allowed, np.exp(LOGITS / temperature), 0.0)
    return weights / weights.sum()


def _top_p_allowed(probs, p):
    """The most likely tokens until their mass reaches p, plus any tied with the last one kept."""
    descending = np.sort(probs)[::-1]
    kept = descending[(np.cumsum(descending) - descending) < p]
    return probs >= kept[-1]


@pytest.mark.parametrize(
    "strategy, allowed",
    [
        (TopK(3, temperature=0.8), np.isin(np.arange(10), [0, 1, 2])),
        (TopK(2, temperature=1.0), np.isin(np.arange(10), [0, 1, 2])),  # the tie at rank 2 stays
        (TopP(0.7, temperature=1.3), _top_p_allowed(_expected(np.ones(10, bool), 1.3), 0.7)),
        (TopKTopP(4, 0.5, temperature=1.0), _top_p_allowed(_expected(np.isin(np.arange(10), [0, 1, 2, 3]), 1.0), 0.5)),
        (Temperature(0.5), np.ones(10, bool)),
    ],
)
def test_samples_stay_in_the_allowed_set_with_the_right_frequencies(strategy, allowed):
    tokens = _draws(strategy)
    assert allowed[tokens].all(), f"sampled outside the allowed set: {sorted(set(tokens[~allowed[tokens]]))}"
    frequencies = np.bincount(tokens, minlength=LOGITS.size) / tokens.size
    np.testing.assert_allclose(frequencies, _expected(allowed, strategy.temperature), atol=0.015)
    assert 1 < allowed.sum() < LOGITS.size or isinstance(strategy, Temperature)


def test_greedy_and_its_limits():
    assert (_draws(Greedy(), 16) == 0).all()
    assert from_params(SamplingParams(temperature=0.0, top_k=5, top_p=0.5)) == Greedy()
    assert (_draws(TopK(1, temperature=2.0), 500) == 0).all()
    assert (_draws(Temperature(1e-3), 500) == 0).all()


@pytest.mark.parametrize("strategy", [Greedy(), Temperature(0.7), TopK(3, 0.8), TopP(0.7, 1.3), TopKTopP(4, 0.5)],
                         ids=repr)
def test_sample_on_vocab_major_logits_is_the_same_draw_with_its_log_prob(strategy):
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.standard_normal((6, 50)).astype(np.float32))
    keys = jax.random.split(jax.random.key(3), 6)
    tokens, logprobs = strategy.sample(logits.T, keys)
    np.testing.assert_array_equal(tokens, strategy(logits, keys))
    weights = strategy.log_weights(logits)
    np.testing.assert_allclose(logprobs, token_log_probs(weights, tokens), atol=1e-6)
    np.testing.assert_allclose(token_log_probs(logits.T, tokens, vocab_axis=0), token_log_probs(logits, tokens),
                               atol=1e-6)


def _nucleus_numpy(logits: np.ndarray, p: float) -> tuple[np.ndarray, float]:
    """The top-p rule in float64 on one row: a token stays when the tokens strictly more likely than
    it hold less than ``p``; also how close any token's mass above comes to ``p``."""
    weights = np.exp(logits.astype(np.float64) - logits.max())
    probs = weights / weights.sum()
    above = np.array([probs[logits > v].sum() for v in logits])
    return above < p, float(np.abs(above - p).min())


@pytest.mark.parametrize("vocab, p", [(7, 0.5), (300, 0.95)])
def test_top_p_keeps_exactly_the_float64_nucleus_without_sorting(vocab, p):
    rng = np.random.default_rng(vocab)
    filtered = jax.jit(top_p_filter, static_argnums=1)
    paths = set()
    for trial in range(40):
        scale = (0.05, 1.0, 4.0, 30.0)[trial % 4]  # flat (bisection) to peaked (among the top candidates)
        logits = rng.standard_normal((4, vocab)).astype(np.float32) * scale
        if trial % 3 == 0:
            logits = np.round(logits)  # ties, and -0.0 next to 0.0
        if trial % 5 == 0:
            logits[:, : vocab // 3] = -np.inf  # as after a top-k filter
        kept = np.isfinite(np.asarray(filtered(jnp.asarray(logits), p)))
        for row in range(4):
            nucleus, margin = _nucleus_numpy(logits[row], p)
            if margin > 1e-6:  # fixed-point rounding may only matter right at the boundary
                np.testing.assert_array_equal(kept[row], nucleus)
            alone = np.isfinite(np.asarray(filtered(jnp.asarray(logits[row:row + 1]), p)))[0]
            np.testing.assert_array_equal(kept[row], alone)  # whichever path its batch took
            paths.add(bool(nucleus.sum() >= TOP_P_CANDIDATES))
    assert paths == ({False, True} if vocab > TOP_P_CANDIDATES else {False})


def test_first_argmax_is_argmax_with_ties_and_stays_in_range_on_nan():
    x = jnp.asarray([[1.0, 3.0, 3.0, -2.0], [0.0, 0.0, 0.0, 0.0], [5.0, jnp.nan, 1.0, 2.0]])
    np.testing.assert_array_equal(first_argmax(x, axis=-1)[:2], jnp.argmax(x[:2], axis=-1))
    np.testing.assert_array_equal(first_argmax(x.T[:, :2], axis=0), [1, 0])
    assert 0 <= int(first_argmax(x, axis=-1)[2]) < 4
    rng = np.random.default_rng(0)
    y = jnp.asarray(rng.integers(0, 3, (50, 7)).astype(np.float32))  # many ties
    np.testing.assert_array_equal(first_argmax(y, axis=0), jnp.argmax(y, axis=0))


def test_from_params_picks_and_validates_strategies():
    assert from_params(SamplingParams(temperature=0.7)) == Temperature(0.7)
    assert from_params(SamplingParams(temperature=0.7, top_k=20)) == TopK(20, 0.7)
    assert from_params(SamplingParams(temperature=0.7, top_p=0.8)) == TopP(0.8, 0.7)
    assert from_params(SamplingParams(temperature=0.7, top_k=20, top_p=0.8)) == TopKTopP(20, 0.8, 0.7)
    with pytest.raises(ValueError, match="TopK: temperature must be > 0"):
        TopK(5, temperature=0.0)
    with pytest.raises(ValueError, match=r"TopP: p must be in \(0, 1\]"):
        TopP(1.5)
    with pytest.raises(ValueError, match="TopKTopP: k must be an int >= 1"):
        TopKTopP(0, 0.5)


def test_bucket_sizes():
    assert [bucket(n) for n in (1, 16, 17, 24, 25, 33, 100, 1000)] == [16, 16, 24, 24, 32, 48, 128, 1024]
    assert bucket(5, minimum=4) == 6


# --- stop strings ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen():
    tokenizer = load_tokenizer(None)
    config = tiny(vocab_size=151936, tie_word_embeddings=False)
    graphdef, state = nnx.split(Qwen3(config, rngs=nnx.Rngs(11)))
    prompts = [tokenizer.encode(text) for text in ("Find the population of Lyon.", "hi")]
    token_bytes = TokenBytes.from_tokenizer(tokenizer, config.vocab_size)
    free = generate(graphdef, state, prompts, strategy=Greedy(), max_new_tokens=24, token_bytes=token_bytes)
    return dict(tokenizer=tokenizer, graphdef=graphdef, state=state, prompts=prompts, token_bytes=token_bytes,
                free=free)


def _stopped(qwen, stops, state=None):
    return generate(qwen["graphdef"], state or qwen["state"], qwen["prompts"], strategy=Greedy(), max_new_tokens=24,
                    stops=stops, token_bytes=qwen["token_bytes"])


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _check_cut(qwen, row, stop, out):
    """The text ends right before the first occurrence; the loop stopped at the completing token."""
    ids = qwen["free"][row].token_ids
    pieces = [qwen["token_bytes"].table[i] for i in ids]
    data = b"".join(pieces)
    at = data.find(stop.encode())
    assert at >= 0
    ends = np.cumsum([len(p) for p in pieces])
    assert out.finish_reason == "stop" and out.stop_string == stop
    assert out.text == data[:at].decode("utf-8", errors="replace")
    assert out.num_generated == int(np.searchsorted(ends, at + len(stop.encode()))) + 1
    whole = int(np.searchsorted(ends, at, side="right"))
    assert out.token_ids == ids[:whole]
    assert out.logprobs == pytest.approx(qwen["free"][row].logprobs[:whole], abs=1e-6)


def _candidate_stops(qwen, row):
    """(spanning two tokens, strictly inside one token) stop strings taken from row's free text."""
    ids = qwen["free"][row].token_ids
    table = qwen["token_bytes"].table
    data = b"".join(table[i] for i in ids)
    spanning = inside = None
    offset = 0
    for k in range(len(ids) - 1):
        left, right = _utf8(table[ids[k]]), _utf8(table[ids[k + 1]])
        if spanning is None and left and right and len(left) >= 2 and len(right) >= 2:
            candidate = left[-2:] + right[:2]
            if data.find(candidate.encode()) == offset + len(table[ids[k]]) - len(left[-2:].encode()):
                spanning = candidate
        if inside is None and left and len(left) >= 3:
            candidate = left[1:-1]
            if data.find(candidate.encode()) == offset + len(left[0].encode()):
                inside = candidate
        offset += len(table[ids[k]])
    assert spanning and inside, f"row {row}: no suitable stop strings in {data!r}"
    return spanning, inside


def test_stop_string_spanning_two_tokens_is_cut_exactly(qwen):
    for row in range(2):
        spanning, _ = _candidate_stops(qwen, row)
        _check_cut(qwen, row, spanning, _stopped(qwen, (spanning,))[row])


def test_stop_string_starting_inside_a_token_is_cut_exactly(qwen):
    for row in range(2):
        _, inside = _candidate_stops(qwen, row)
        out = _stopped(qwen, (inside,))[row]
        _check_cut(qwen, row, inside, out)
        # The token holding the stop string's start is dropped; its bytes before the stop stay in the text.
        whole_tokens_text = qwen["token_bytes"].text(out.token_ids)
        assert whole_tokens_text != out.text and out.text.startswith(whole_tokens_text)


def test_special_token_stop_is_exact(qwen):
    """Makes the model emit <tool_response> (one token) mid-answer, then stops on it."""
    tool_response = qwen["tokenizer"].convert_tokens_to_ids("<tool_response>")
    target = qwen["free"][0].token_ids[5]
    state = jax.tree.map(lambda x: x, qwen["state"])
    head = state["lm_head"].get_value()
    state["lm_head"].set_value(head.at[tool_response].set(1.5 * head[target]))
    free = generate(qwen["graphdef"], state, qwen["prompts"], strategy=Greedy(), max_new_tokens=24,
                    token_bytes=qwen["token_bytes"])
    first = free[0].token_ids.index(tool_response)
    assert first <= 5 and "<tool_response>" in free[0].text
    out = _stopped(qwen, ("</tool_call>", "<tool_response>"), state=state)[0]
    assert out.finish_reason == "stop" and out.stop_string == "<tool_response>"
    assert out.num_generated == first + 1
    assert out.token_ids == free[0].token_ids[:first]
    assert out.text == qwen["token_bytes"].text(free[0].token_ids[:first]) == free[0].text.split("<tool_response>")[0]


def test_no_stop_found_leaves_the_generation_alone(qwen):
    out = _stopped(qwen, ("\x00never\x00",))
    for free, kept in zip(qwen["free"], out):
        assert kept.finish_reason == "length" and kept.stop_string is None
        assert kept.token_ids == free.token_ids and kept.text == free.text


def test_token_bytes_of_the_qwen_vocabulary_and_of_other_tokenizers(qwen):
    table = qwen["token_bytes"].table
    assert table[qwen["tokenizer"].convert_tokens_to_ids("<tool_response>")] == b"<tool_response>"
    assert table[151700] == b""  # the model's padding ids past the tokenizer
    assert qwen["token_bytes"].join(qwen["tokenizer"].encode("caf\u00e9 \u5b66")) == "caf\u00e9 \u5b66".encode()
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    word_level.decoder = tokenizers.decoders.WordPiece()
    with pytest.raises(ValueError, match="needs a byte-level BPE tokenizer"):
        TokenBytes.from_tokenizer(transformers.PreTrainedTokenizerFast(tokenizer_object=word_level), 2)
    with pytest.raises(ValueError, match="tokenizer has 151669 tokens but the model vocabulary is only 512"):
        TokenBytes.from_tokenizer(qwen["tokenizer"], 512)


def test_host_cut_on_hand_built_qwen_tokens(qwen):
    tokenizer, token_bytes = qwen["tokenizer"], qwen["token_bytes"]
    stops = ("</tool_call>", "<tool_response>")
    ids = tokenizer.encode('x <tool_call>\n{"name": "search"}\n</tool_call> more <tool_response>')
    cut = cut_at_stop(ids, token_bytes, stops)
    assert cut.stop_string == "</tool_call>" and cut.text == 'x <tool_call>\n{"name": "search"}\n'
    assert cut.num_tokens == ids.index(tokenizer.convert_tokens_to_ids("</tool_call>"))
    spelled = tokenizer.encode("a </tool_c") + tokenizer.encode("all>b")  # the tag written as plain tokens
    cut = cut_at_stop(spelled, token_bytes, stops)
    assert cut.text == "a " and cut.stop_string == "</tool_call>"
    assert token_bytes.text(ids) == tokenizer.decode(ids)


def _first_match_on_device_table(table: StopTable, ids):
    state = 0
    for k, token in enumerate(ids):
        state = table.transitions[state, token]
        if state == MATCHED:
            return k
    return None


def _first_match_by_search(token_bytes, stops, ids):
    for k in range(len(ids)):
        data = token_bytes.join(ids[: k + 1])
        if any(s.encode() in data for s in stops):
            return k
    return None


SMALL_VOCAB = TokenBytes([b"a", b"b", b"ab", b"ba", b"aab", b"", b"bab", b"<t>", b"b<", b"t>a", b"\xc3", b"\xa9"])


@settings(max_examples=300, deadline=None)
@given(
    stops=st.lists(st.sampled_from(["ab", "aa", "bab", "<t>", "b<t", "a\u00e9b", "baa", "abab"]), min_size=1,
                   max_size=3),
    ids=st.lists(st.integers(0, len(SMALL_VOCAB) - 1), max_size=12),
)
def test_stop_table_fires_at_the_first_token_completing_any_stop(stops, ids):
    table = StopTable.build(stops, SMALL_VOCAB)
    assert _first_match_on_device_table(table, ids) == _first_match_by_search(SMALL_VOCAB, stops, ids)


def test_stop_table_validation():
    with pytest.raises(ValueError, match=r"stop\[1\] = ''"):
        StopTable.build(("a", ""), SMALL_VOCAB)
    assert StopTable.build(("ab",), SMALL_VOCAB).transitions.shape == (32, len(SMALL_VOCAB))
    assert dataclasses.is_dataclass(StopTable.never(5)) and not StopTable.never(5).transitions.any()


# --- presence / frequency penalties ----------------------------------------------------------

PENALTIES = Penalties(presence=1.1, frequency=0.4)


def _penalized_numpy(logits: np.ndarray, generated: np.ndarray, penalties: Penalties) -> np.ndarray:
    """The OpenAI / vLLM definition on one row: counts of the generated tokens only."""
    counts = np.bincount(generated.astype(np.int64), minlength=logits.shape[-1]).astype(np.float32)
    return logits - penalties.frequency * counts - penalties.presence * (counts > 0)


def test_penalties_apply_equals_numpy_in_both_layouts():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((3, 40)).astype(np.float32)
    generated = [rng.integers(0, 40, n) for n in (0, 5, 30)]
    counts = np.stack([np.bincount(g, minlength=40) for g in generated]).astype(np.int32)
    expected = np.stack([_penalized_numpy(l, g, PENALTIES) for l, g in zip(logits, generated)])
    np.testing.assert_allclose(PENALTIES.apply(jnp.asarray(logits), jnp.asarray(counts)), expected, atol=1e-6)
    np.testing.assert_allclose(PENALTIES.apply(jnp.asarray(logits.T), jnp.asarray(counts.T)), expected.T, atol=1e-6)
    assert penalties_from_params(SamplingParams()) is None
    assert penalties_from_params(SamplingParams(presence_penalty=1.1)) == Penalties(1.1, 0.0)
    with pytest.raises(ValueError, match="presence_penalty must be in"):
        SamplingParams(presence_penalty=2.5)


def test_greedy_with_penalties_equals_a_numpy_greedy_loop_on_transformers_logits(parity, greedy):
    ours = generate(parity["graphdef"], parity["state"], parity["prompts"], strategy=Greedy(),
                    max_new_tokens=NEW_TOKENS, penalties=PENALTIES)
    for prompt, out in zip(parity["prompts"], ours):
        sequence = list(prompt)
        for _ in range(NEW_TOKENS):
            with torch.no_grad():
                logits = parity["hf"](torch.as_tensor([sequence])).logits[0, -1].numpy()
            sequence.append(int(np.argmax(_penalized_numpy(logits, np.asarray(sequence[len(prompt):]), PENALTIES))))
        assert list(out.token_ids) == sequence[len(prompt):]
    assert [o.token_ids for o in greedy] != [o.token_ids for o in ours]  # the penalties changed something


def test_sampling_logprobs_are_under_the_penalized_distribution(parity):
    outputs = _sampled(parity, penalties=PENALTIES)
    for prompt, out in zip(parity["prompts"], outputs):
        with torch.no_grad():  # transformers' logits: no JAX forward to compile
            logits = parity["hf"](torch.as_tensor(np.concatenate([prompt, out.token_ids])[None])).logits[0].numpy()
        generated = np.asarray(out.token_ids)
        for t, token in enumerate(generated):
            raw = logits[len(prompt) - 1 + t]
            scaled = _penalized_numpy(raw, generated[:t], PENALTIES) / SAMPLED.temperature
            kth = np.sort(scaled)[-SAMPLED.k]
            expected = _log_softmax(np.where(scaled >= kth, scaled, -np.inf))[token]
            np.testing.assert_allclose(out.sampling_logprobs[t], expected, atol=1e-4, rtol=0)
            np.testing.assert_allclose(out.logprobs[t], _log_softmax(raw)[token], atol=1e-4, rtol=0)
