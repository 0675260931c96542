"""Checkpoint I/O: sharded and bf16 loading, export (staging, stale files, streaming, multi-host,
tokenizer, generation config), index files, and clear errors for every kind of bad checkpoint."""

import json
import os
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from expint_jax import storage
from expint_jax.models import hf
from expint_jax.models.config import ConfigError, DTypePolicy, preset, preset_names, tiny
from expint_jax.models.hf import CheckpointError, load_checkpoint, save_checkpoint, tensor_map
from expint_jax.models.qwen3 import Qwen3
from expint_jax.models.tokenizer import load_tokenizer, save_tokenizer
from expint_jax.parallel.mesh import MeshConfig, make_mesh
from expint_jax.models.init import init_model
from tests.models.hf_fixtures import hf_logits, make_checkpoint

SMALL = tiny(vocab_size=512, hidden_size=64, intermediate_size=96, num_heads=4, num_kv_heads=2, head_dim=16,
             tie_word_embeddings=False)
BF16 = DTypePolicy("bfloat16", "bfloat16")


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


def _params(model) -> dict[str, jax.Array]:
    return {"/".join(map(str, path)): v.get_value() for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_bf16_export_reloads_with_bf16_params(checkpoint, tmp_path):
    directory, _ = checkpoint
    model = load_checkpoint(directory)
    save_checkpoint(model, tmp_path / "bf16", dtype="bfloat16")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["rope_parameters"]["rope_theta"] == 1e6
    assert (tmp_path / "bf16" / "generation_config.json").exists()
    tensors = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {str(t.dtype) for t in tensors.values()} == {"bfloat16"}
    reloaded = _params(load_checkpoint(tmp_path / "bf16", policy=BF16))
    for name, value in _params(model).items():
        assert reloaded[name].dtype == jnp.bfloat16, name
        np.testing.assert_array_equal(np.asarray(reloaded[name]), np.asarray(value.astype(jnp.bfloat16)), err_msg=name)


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """A transformers Qwen3 saved in torch.bfloat16, as real Qwen3 checkpoints are."""
    directory = tmp_path_factory.mktemp("bf16_ckpt")
    return directory, make_checkpoint(directory, seed=4, dtype=torch.bfloat16)


def test_bf16_checkpoint_loads_exactly_with_fp32_or_bf16_params(bf16_checkpoint, tmp_path):
    directory, _ = bf16_checkpoint
    stored = load_file(directory / "model.safetensors")
    assert {str(t.dtype) for t in stored.values()} == {"bfloat16"}
    for policy, name in [(DTypePolicy(), "float32"), (BF16, "bfloat16")]:
        model = load_checkpoint(directory, policy=policy)
        assert {str(v.dtype) for v in _params(model).values()} == {name}
        # Exporting in fp32 shows every tensor: the bf16 values upcast, exactly.
        exported = load_file(save_checkpoint(model, tmp_path / name, dtype="float32") / "model.safetensors")
        assert set(exported) == set(stored)
        for key, value in stored.items():
            np.testing.assert_array_equal(exported[key], value.astype(np.float32), err_msg=key)


def test_forward_with_bf16_params_and_compute_is_close_to_fp32(bf16_checkpoint):
    directory, _ = bf16_checkpoint
    fp32, bf16 = load_checkpoint(directory), load_checkpoint(directory, policy=BF16)
    # Reloaded in fp32 (not the bf16 module upcast, whose RoPE buffer was rounded to bf16).
    ref = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 512, size=(2, 12))
    positions = np.broadcast_to(np.arange(12), (2, 12))
    want = np.asarray(fp32(jnp.asarray(ids), jnp.asarray(positions)))
    # fp32 on the bf16 weights is still transformers' model (same weights upcast)
    np.testing.assert_allclose(want, hf_logits(ref, ids, positions), atol=1e-4, rtol=0)
    got = bf16(jnp.asarray(ids), jnp.asarray(positions))
    assert got.dtype == jnp.float32  # logits are returned in fp32 under any policy
    got = np.asarray(got)
    # bf16 keeps 8 bits of mantissa (relative step 2**-8 = 0.4%); here two layers of bf16 matmuls
    # land at 0.7% (max) and 0.12% (mean) of the logit scale; a wrong weight or layout is O(100%).
    scale = float(np.max(np.abs(want)))
    assert float(np.max(np.abs(got - want))) <= 0.02 * scale
    assert float(np.mean(np.abs(got - want))) <= 0.004 * scale


def _checkpoint_files(directory: Path) -> list[str]:
    return sorted(f.name for f in directory.iterdir() if f.name.startswith("model"))


def test_export_into_an_existing_directory_replaces_the_old_checkpoint(tmp_path):
    out = tmp_path / "out"
    three, one = init_model(SMALL, seed=1), init_model(SMALL, seed=2)
    total = sum(v.nbytes for v in _params(three).values())
    save_checkpoint(three, out, max_shard_bytes=total // 2)
    assert _checkpoint_files(out) == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                                      "model-00003-of-00003.safetensors", "model.safetensors.index.json"]
    (out / "README.md").write_text("not ours")
    save_checkpoint(one, out)
    assert _checkpoint_files(out) == ["model.safetensors"]  # no stale shards or index
    assert (out / "README.md").read_text() == "not ours"  # other files are left alone
    assert [f.name for f in tmp_path.iterdir()] == ["out"]  # no staging directory left behind
    reloaded = _params(load_checkpoint(out))
    for name, value in _params(one).items():
        np.testing.assert_array_equal(np.asarray(reloaded[name]), np.asarray(value), err_msg=name)
    save_checkpoint(three, out, max_shard_bytes=total // 2)  # and back: no stale model.safetensors
    assert "model.safetensors" not in _checkpoint_files(out)
    np.testing.assert_array_equal(np.asarray(load_checkpoint(out).embed[...]), np.asarray(three.embed[...]))


def test_export_gathers_and_writes_one_shard_at_a_time(tmp_path, monkeypatch):
    model = init_model(SMALL, seed=3)
    events = []
    to_host, write_bytes = hf._to_host, storage.write_bytes
    monkeypatch.setattr(hf, "_to_host", lambda x: events.append("gather") or to_host(x))
    monkeypatch.setattr(storage, "write_bytes",
                        lambda path, data: events.append(Path(path).name) or write_bytes(path, data))
    save_checkpoint(model, tmp_path / "out", max_shard_bytes=60_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) > 2
    # gathers of a shard's tensors, then its file, then the next shard's gathers
    expected = []
    for shard in shards:
        expected += ["gather"] * sum(1 for f in index.values() if f == shard) + [shard]
    assert [e for e in events if e == "gather" or e.endswith(".safetensors")] == expected


def test_arrays_spread_over_hosts_are_all_gathered(monkeypatch):
    calls = []

    def process_allgather(x, tiled=False):
        calls.append(tiled)
        return np.arange(4)

    monkeypatch.setattr(hf.multihost_utils, "process_allgather", process_allgather)
    np.testing.assert_array_equal(hf._to_host(jnp.arange(4) * 2), np.arange(4) * 2)
    assert calls == []  # fully addressable: a plain device_get
    np.testing.assert_array_equal(hf._to_host(types.SimpleNamespace(is_fully_addressable=False)), np.arange(4))
    assert calls == [True]


def test_only_process_zero_writes_but_every_process_gathers(tmp_path, monkeypatch):
    model = init_model(SMALL, seed=3)
    gathered, barriers = [], []
    to_host = hf._to_host
    monkeypatch.setattr(hf, "_to_host", lambda x: gathered.append(x.shape) or to_host(x))
    monkeypatch.setattr(hf.multihost_utils, "sync_global_devices", barriers.append)
    monkeypatch.setattr(hf, "_spans_processes", lambda params: True)  # as on a mesh over several processes
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    save_checkpoint(model, tmp_path / "out", max_shard_bytes=60_000)
    assert list(tmp_path.iterdir()) == []
    assert len(gathered) == len(tensor_map(SMALL))  # the collectives happen on every process
    assert len(barriers) == 1


def test_a_model_on_this_process_alone_is_exported_by_it_without_a_collective(tmp_path, monkeypatch):
    model = init_model(SMALL, seed=3)  # on this process's devices only (e.g. the copy process 0 acts with)
    barriers = []
    monkeypatch.setattr(hf.multihost_utils, "sync_global_devices", barriers.append)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    save_checkpoint(model, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file() and barriers == []


def test_export_writes_the_tokenizer_and_the_source_generation_config(checkpoint, tmp_path):
    source = _copy(checkpoint[0], tmp_path / "src")
    tok = load_tokenizer(None)  # the real Qwen3 tokenizer, built offline
    save_tokenizer(tok, source)
    own = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643, "temperature": 0.6,
           "top_k": 20, "top_p": 0.95, "do_sample": True}
    (source / "generation_config.json").write_text(json.dumps(own))
    model = load_checkpoint(source)
    text = "Qwen3 <think>\nplan</think> <tool_call>\n{\"name\": \"search\"}\n</tool_call> 数学 déjà-vu\t  x=1"
    for out, kwargs in [(tmp_path / "from_source", dict(source_dir=source)), (tmp_path / "given", dict(tokenizer=tok))]:
        save_checkpoint(model, out, **kwargs)
        reloaded = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
        assert reloaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert json.loads((tmp_path / "from_source" / "generation_config.json").read_text()) == own
    default = json.loads((tmp_path / "given" / "generation_config.json").read_text())
    assert default["eos_token_id"] == model.config.eos_token_id and default["bos_token_id"] == model.config.bos_token_id


def _open_in_process(directory: Path) -> list[str]:
    """Files under ``directory`` this process has open or memory-mapped (Linux /proc)."""
    fds = [os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")]
    maps = [line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if len(line.split()) > 5]
    return [f for f in fds + maps if f.startswith(str(directory.resolve()))]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_checkpoint_files_are_closed_after_loading_and_after_errors(checkpoint, tmp_path):
    directory = _copy(checkpoint[0], tmp_path / "c")
    load_checkpoint(directory)
    assert _open_in_process(directory) == []
    _rewrite(directory, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(directory)
    assert _open_in_process(directory) == []  # even while the traceback is alive
    del error


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


# Published Qwen3 config.json values (huggingface.co/Qwen/<name>/blob/main/config.json) and the
# total parameter counts of the model cards (embeddings included; tied heads counted once).
PUBLISHED = {
    #               layers hidden heads kv head_dim inter   tied   rope_theta total
    "Qwen3-0.6B": (28, 1024, 16, 8, 128, 3072, True, 1e6, 0.60e9),
    "Qwen3-4B": (36, 2560, 32, 8, 128, 9728, True, 1e6, 4.02e9),
    "Qwen3-14B": (40, 5120, 40, 8, 128, 17408, False, 1e6, 14.8e9),
    "Qwen3-32B": (64, 5120, 64, 8, 128, 25600, False, 1e6, 32.8e9),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_have_the_published_shapes_and_sizes(name):
    c = preset(name)
    layers, hidden, heads, kv, head_dim, inter, tied, theta, total = PUBLISHED[name]
    got = (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size,
           c.tie_word_embeddings, c.rope_theta)
    assert got == (layers, hidden, heads, kv, head_dim, inter, tied, theta)
    assert c.vocab_size == 151936 and not c.attention_bias
    assert abs(c.num_params / total - 1) < 0.02, f"{name}: {c.num_params / 1e9:.3f}B vs published {total / 1e9}B"
    # num_params counts exactly what the model allocates
    abstract = nnx.state(nnx.eval_shape(lambda: Qwen3(c, rngs=nnx.Rngs(0))), nnx.Param)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract)) == c.num_params


def test_preset_names_and_the_other_presets():
    names = preset_names()
    assert {"Qwen3-0.6B", "Qwen3-1.7B", "Qwen3-4B", "Qwen3-4B-Instruct-2507", "Qwen3-8B", "Qwen3-14B", "Qwen3-32B"} <= set(names)
    instruct = preset("Qwen/Qwen3-4B-Instruct-2507")
    assert instruct.rope_theta == 5e6 and instruct.num_layers == 36 and instruct.tie_word_embeddings
    assert abs(preset("Qwen3-1.7B").num_params / 1e9 - 1.72) < 0.03
    assert abs(preset("Qwen3-8B").num_params / 1e9 - 8.19) < 0.05
    with pytest.raises(ConfigError, match="unknown preset 'Qwen3-5B'"):
        preset("Qwen3-5B")
