"""Checkpoint I/O: sharded loading, index files, and clear errors for every kind of bad checkpoint."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from expint_jax.models.config import ConfigError, preset, preset_names
from expint_jax.models.hf import CheckpointError, load_checkpoint, save_checkpoint
from expint_jax.parallel.mesh import MeshConfig, make_mesh
from tests.models.hf_fixtures import hf_logits, make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    model = make_checkpoint(directory, tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=2)
    return directory, model


def _rewrite(directory, mutate):
    tensors = load_file(directory / "model.safetensors")
    mutate(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_load_into_mesh_is_sharded_and_exact(checkpoint):
    directory, ref = checkpoint
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model = load_checkpoint(directory, mesh=mesh)
    q = model.layers["q_proj"][...]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    ids = np.arange(20).reshape(2, 10) % 512
    positions = np.broadcast_to(np.arange(10), (2, 10))
    with jax.set_mesh(mesh):
        got = np.asarray(jax.jit(lambda i, p: model(i, p))(jnp.asarray(ids), jnp.asarray(positions)))
    np.testing.assert_allclose(got, hf_logits(ref, ids, positions), atol=1e-4, rtol=0)


def test_bf16_export_loads_with_bf16_params(checkpoint, tmp_path):
    directory, _ = checkpoint
    model = load_checkpoint(directory)
    save_checkpoint(model, tmp_path / "bf16", dtype="bfloat16")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["rope_parameters"]["rope_theta"] == 1e6
    assert (tmp_path / "bf16" / "generation_config.json").exists()
    tensors = load_file(tmp_path / "bf16" / "model.safetensors")
    assert str(tensors["model.embed_tokens.weight"].dtype) == "bfloat16"


def test_missing_tensor_is_named(checkpoint, tmp_path):
    directory = _copy(checkpoint[0], tmp_path / "c")
    _rewrite(directory, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): model\.layers\.1\.mlp\.up_proj\.weight"):
        load_checkpoint(directory)


def test_unexpected_tensor_is_named(checkpoint, tmp_path):
    directory = _copy(checkpoint[0], tmp_path / "c")
    _rewrite(directory, lambda t: t.update({"model.layers.9.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\): model\.layers\.9\.extra\.weight"):
        load_checkpoint(directory)


def test_shape_mismatch_names_tensor_and_both_shapes(checkpoint, tmp_path):
    directory = _copy(checkpoint[0], tmp_path / "c")
    _rewrite(directory, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((40, 64), np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight: checkpoint \(40, 64\) vs model \(48, 64\)"):
        load_checkpoint(directory)


def test_unknown_model_type_is_refused_by_name(checkpoint, tmp_path):
    directory = _copy(checkpoint[0], tmp_path / "c")
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "llama"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="model_type 'llama' is not supported"):
        load_checkpoint(directory)


@pytest.mark.parametrize("damage", ["truncated", "garbage_header"])
def test_corrupt_safetensors_is_a_clear_error(checkpoint, tmp_path, damage):
    directory = _copy(checkpoint[0], tmp_path / "c")
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 64 + data[64:])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(directory)


def test_index_pointing_to_missing_file(checkpoint, tmp_path):
    directory = _copy(checkpoint[0], tmp_path / "c")
    weight_map = {k: "model-00002-of-00002.safetensors" for k in load_file(directory / "model.safetensors")}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: listed in the index but missing"):
        load_checkpoint(directory)


def test_presets_are_the_published_shapes():
    names = preset_names()
    assert {"Qwen3-0.6B", "Qwen3-1.7B", "Qwen3-4B", "Qwen3-4B-Instruct-2507", "Qwen3-8B", "Qwen3-14B", "Qwen3-32B"} <= set(names)
    instruct = preset("Qwen/Qwen3-4B-Instruct-2507")
    assert instruct.rope_theta == 5e6 and instruct.num_layers == 36 and instruct.tie_word_embeddings
    assert abs(preset("Qwen3-1.7B").num_params / 1e9 - 1.72) < 0.03
    assert abs(preset("Qwen3-8B").num_params / 1e9 - 8.19) < 0.05
    with pytest.raises(ConfigError, match="unknown preset 'Qwen3-5B'"):
        preset("Qwen3-5B")
