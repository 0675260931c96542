"""Our Qwen3 vs transformers.Qwen3ForCausalLM on tiny random checkpoints, fp32, max |dlogit| <= 1e-4."""

import numpy as np
import pytest
import transformers

import jax.numpy as jnp

from expint_jax.models.hf import load_checkpoint, save_checkpoint
from tests.models.hf_fixtures import hf_logits, make_checkpoint

TOL = 1e-4
CASES = {
    "untied_gqa2_theta1e6": dict(tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6),
    "tied_gqa1_theta1e4": dict(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=4, rope_theta=1e4),
    "untied_gqa4_headdim40": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=40, rope_theta=1e6),
    "tied_gqa4_bias": dict(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=1, attention_bias=True,
                           rope_theta=1e4),
}


def _random_ids(rng, shape, vocab=512):
    return rng.integers(0, vocab, size=shape, dtype=np.int64)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case, attention_path):
    ref = make_checkpoint(tmp_path, **CASES[case])
    ours = load_checkpoint(tmp_path)
    rng = np.random.default_rng(0)
    ids = _random_ids(rng, (2, 17))
    positions = np.broadcast_to(np.arange(17), (2, 17))
    got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(positions)))
    want = hf_logits(ref, ids, positions)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_left_padded_batch(tmp_path, attention_path):
    ref = make_checkpoint(tmp_path)
    ours = load_checkpoint(tmp_path)
    rng = np.random.default_rng(1)
    lengths = [11, 6, 1]
    width = max(lengths)
    ids = _random_ids(rng, (3, width))
    valid = np.arange(width)[None, :] >= (width - np.array(lengths))[:, None]
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(positions), segment_ids=jnp.asarray(valid.astype(np.int32))))
    for row, length in enumerate(lengths):  # each row alone, unpadded
        want = hf_logits(ref, ids[row:row + 1, width - length:], np.arange(length)[None])
        np.testing.assert_allclose(got[row, width - length:], want[0], atol=TOL, rtol=0)


def test_packed_batch_with_two_segments(tmp_path, attention_path):
    ref = make_checkpoint(tmp_path, num_attention_heads=4, num_key_value_heads=2)
    ours = load_checkpoint(tmp_path)
    rng = np.random.default_rng(2)
    first, second, pad = 9, 7, 3
    ids = _random_ids(rng, (1, first + second + pad))
    segments = np.array([[1] * first + [2] * second + [0] * pad], np.int32)
    positions = np.array([list(range(first)) + list(range(second)) + [0] * pad])
    got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(positions), segment_ids=jnp.asarray(segments)))
    want_a = hf_logits(ref, ids[:, :first], np.arange(first)[None])
    want_b = hf_logits(ref, ids[:, first:first + second], np.arange(second)[None])
    np.testing.assert_allclose(got[0, :first], want_a[0], atol=TOL, rtol=0)
    np.testing.assert_allclose(got[0, first:first + second], want_b[0], atol=TOL, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_import_export_reload(tmp_path, tied):
    source, exported = tmp_path / "src", tmp_path / "out"
    ref = make_checkpoint(source, tie_word_embeddings=tied)
    ours = load_checkpoint(source)
    save_checkpoint(ours, exported, dtype="float32", max_shard_bytes=200_000)  # forces several shards
    assert (exported / "model.safetensors.index.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype="float32").eval()
    ids = _random_ids(np.random.default_rng(3), (2, 13))
    positions = np.broadcast_to(np.arange(13), (2, 13))
    np.testing.assert_allclose(hf_logits(reloaded, ids, positions), hf_logits(ref, ids, positions), atol=1e-6, rtol=0)
    again = load_checkpoint(exported)
    np.testing.assert_array_equal(np.asarray(again.embed[...]), np.asarray(ours.embed[...]))
