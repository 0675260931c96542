"""Hugging Face Qwen3 checkpoints <-> our NNX ``Qwen3``, one tensor at a time.

Import (``load_checkpoint``): reads ``config.json``, checks every tensor's name and shape from the
safetensors headers first (one error listing all missing, unexpected and mis-shaped tensors),
then reads the tensors one at a time into host memory and places each straight into an array
that already carries its final sharding (every device receives only its own block). Stacked
layer parameters are filled layer by layer on device, so the host never holds more than one
checkpoint tensor (no full host copy of the model). The files are closed when loading ends.

Export (``save_checkpoint``): writes safetensors shards (bounded size, with
``model.safetensors.index.json`` when there is more than one), ``config.json``,
``generation_config.json`` and tokenizer files when given; the directory loads with
``transformers.AutoModelForCausalLM.from_pretrained``. Shards are planned from the parameter
shapes, then gathered and written one at a time (host memory peaks at about two shards). All
files are first written to a staging directory beside the target, then moved in with atomic
renames; checkpoint files of an earlier export that the new one does not have (other shard
counts, a stale index) are removed, other files in the directory are left alone. With tied
embeddings no ``lm_head.weight`` is written, as transformers 5 does.

Multi-host: exporting a model whose arrays span several processes is collective. Every process
must call ``save_checkpoint``; arrays that are not fully addressable are gathered with
``multihost_utils.process_allgather``; only process 0 writes files, and every process returns once
they exist. A model held on this process's devices alone (e.g. the copy process 0 acts with in
the multi-host loop) is exported by this process alone, with no collective.

Layout mapping (HF ``[out, in]`` Linear weights vs our ``[in, ...out]`` einsum kernels) lives in
``tensor_map`` (``_LAYER_MAP``, ``_BIAS_MAP``) only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as safetensors_bytes

from expint_jax import storage
from expint_jax.models.config import DTypePolicy, Qwen3Config
from expint_jax.models.init import abstract_model
from expint_jax.models.qwen3 import Qwen3
from expint_jax.models.tokenizer import load_tokenizer, save_tokenizer
from expint_jax.parallel.rules import DEFAULT_RULES, LogicalRules, logical_to_spec, param_shardings

log = logging.getLogger(__name__)

_INDEX = "model.safetensors.index.json"
_NP_DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}


class CheckpointError(ValueError):
    """A checkpoint that does not match the model; the message names files, tensors and shapes."""


@dataclasses.dataclass(frozen=True)
class _Mapping:
    """How one HF tensor becomes (a layer slice of) one of our parameters, and back."""

    ours: str  # parameter path: "embed", "final_norm", "lm_head" or "layers/<name>"
    to_ours: Callable[[np.ndarray, Qwen3Config], np.ndarray]
    to_hf: Callable[[np.ndarray, Qwen3Config], np.ndarray]


def _identity(t: np.ndarray, _: Qwen3Config) -> np.ndarray:
    return t


def _in_heads(heads_attr: str) -> _Mapping:
    """HF [heads*head_dim, embed] <-> ours [embed, heads, head_dim]."""

    def to_ours(t, c):
        return t.T.reshape(c.hidden_size, getattr(c, heads_attr), c.head_dim)

    def to_hf(t, c):
        return t.reshape(c.hidden_size, -1).T

    return to_ours, to_hf


def _heads_bias(heads_attr: str):
    return (lambda t, c: t.reshape(getattr(c, heads_attr), c.head_dim)), (lambda t, c: t.reshape(-1))


def _transpose(t: np.ndarray, _: Qwen3Config) -> np.ndarray:
    return t.T


def _o_to_ours(t, c):  # HF [embed, heads*head_dim] -> ours [heads, head_dim, embed]
    return t.T.reshape(c.num_heads, c.head_dim, c.hidden_size)


def _o_to_hf(t, c):
    return t.reshape(-1, c.hidden_size).T


_LAYER_MAP: dict[str, _Mapping] = {
    "input_layernorm.weight": _Mapping("layers/attn_norm", _identity, _identity),
    "self_attn.q_proj.weight": _Mapping("layers/q_proj", *_in_heads("num_heads")),
    "self_attn.k_proj.weight": _Mapping("layers/k_proj", *_in_heads("num_kv_heads")),
    "self_attn.v_proj.weight": _Mapping("layers/v_proj", *_in_heads("num_kv_heads")),
    "self_attn.o_proj.weight": _Mapping("layers/o_proj", _o_to_ours, _o_to_hf),
    "self_attn.q_norm.weight": _Mapping("layers/q_norm", _identity, _identity),
    "self_attn.k_norm.weight": _Mapping("layers/k_norm", _identity, _identity),
    "post_attention_layernorm.weight": _Mapping("layers/mlp_norm", _identity, _identity),
    "mlp.gate_proj.weight": _Mapping("layers/gate_proj", _transpose, _transpose),
    "mlp.up_proj.weight": _Mapping("layers/up_proj", _transpose, _transpose),
    "mlp.down_proj.weight": _Mapping("layers/down_proj", _transpose, _transpose),
}
_BIAS_MAP: dict[str, _Mapping] = {
    "self_attn.q_proj.bias": _Mapping("layers/q_bias", *_heads_bias("num_heads")),
    "self_attn.k_proj.bias": _Mapping("layers/k_bias", *_heads_bias("num_kv_heads")),
    "self_attn.v_proj.bias": _Mapping("layers/v_bias", *_heads_bias("num_kv_heads")),
    "self_attn.o_proj.bias": _Mapping("layers/o_bias", _identity, _identity),
}


def tensor_map(config: Qwen3Config) -> dict[str, tuple[_Mapping, int | None]]:
    """Every HF tensor name the model needs -> (mapping, layer index or None)."""
    out: dict[str, tuple[_Mapping, int | None]] = {
        "model.embed_tokens.weight": (_Mapping("embed", _identity, _identity), None),
        "model.norm.weight": (_Mapping("final_norm", _identity, _identity), None),
    }
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (_Mapping("lm_head", _identity, _identity), None)
    per_layer = _LAYER_MAP | (_BIAS_MAP if config.attention_bias else {})
    for i in range(config.num_layers):
        for suffix, mapping in per_layer.items():
            out[f"model.layers.{i}.{suffix}"] = (mapping, i)
    return out


def _expected_hf_shape(mapping: _Mapping, layer: int | None, ours_shape: tuple[int, ...], config: Qwen3Config):
    slice_shape = ours_shape[1:] if layer is not None else ours_shape
    return mapping.to_hf(np.empty(slice_shape, np.uint8), config).shape


# ---------------------------------------------------------------------------------------------
# Reading


class _SafetensorsDirectory(contextlib.AbstractContextManager):
    """The tensors of a checkpoint directory: name -> file, shapes from headers, reads on demand.

    A context manager: leaving it closes every file it opened (also when opening a later file or
    checking the index fails, so an error never leaves files open behind it).
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self._files = contextlib.ExitStack()
        self._handles: dict[str, Any] = {}
        self.file_of: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        try:
            self._index()
        except BaseException:
            self.close()
            raise

    def _index(self) -> None:
        index = self.directory / _INDEX
        if index.exists():
            weight_map = storage.read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.directory}: no *.safetensors files and no {_INDEX}")
            weight_map = None
        for name in files:
            handle = self._open(name)
            for key in handle.keys():
                self.file_of[key] = name
                self.shapes[key] = tuple(handle.get_slice(key).get_shape())
        if weight_map is not None:
            for key, name in weight_map.items():
                if key not in self.file_of:
                    raise CheckpointError(f"{index}: tensor {key!r} is listed in {name} but that file does not hold it")

    def _open(self, name: str):
        path = self.directory / name
        if not path.exists():
            raise CheckpointError(f"{path}: listed in the index but missing")
        try:
            handle = safe_open(str(path), framework="numpy")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        self._handles[name] = handle = self._files.enter_context(handle)
        return handle

    def read(self, key: str) -> np.ndarray:
        """The whole tensor ``key``, read into host memory."""
        name = self.file_of[key]
        try:
            return self._handles[name].get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{self.directory / name}: cannot read tensor {key!r} ({e})") from None

    def close(self) -> None:
        self._files.close()
        self._handles.clear()

    def __exit__(self, *exc_info) -> None:
        self.close()


def _check_tensors(files: _SafetensorsDirectory, expected: Mapping[str, tuple[int, ...]], tied: bool) -> None:
    present = set(files.shapes)
    ignorable = {"lm_head.weight"} if tied else set()  # older exports write the tied head too
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected) - ignorable - {k for k in present if k.endswith("rotary_emb.inv_freq")})
    wrong = [
        f"  {k}: checkpoint {files.shapes[k]} vs model {expected[k]}"
        for k in sorted(set(expected) & present)
        if files.shapes[k] != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:20])}" + (" ..." if len(unexpected) > 20 else ""))
    if wrong:
        problems.append("shape mismatches:\n" + "\n".join(wrong))
    if problems:
        raise CheckpointError(f"{files.directory}: checkpoint does not match the Qwen3 config:\n" + "\n".join(problems))


def _flat_params(state: nnx.State) -> dict[str, nnx.Variable]:
    flat = {}
    for path, variable in nnx.to_flat_state(state):
        flat["/".join(str(p) for p in path)] = variable
    return flat


def load_checkpoint(
    path: str | Path,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: LogicalRules = DEFAULT_RULES,
    policy: DTypePolicy | None = None,
    remat: str = "none",
) -> Qwen3:
    """Loads a Hugging Face Qwen3 directory into a (sharded, when ``mesh`` is given) ``Qwen3``.

    Args:
      path: the directory (``config.json`` and safetensors shards, with or without an index).
      mesh: place each tensor directly into its sharding on this mesh; ``None`` for one device.
      rules: logical-axis rules mapping parameter axes to mesh axes.
      policy: parameter and compute dtypes (default ``DTypePolicy()``); tensors are cast to its parameter dtype.
      remat: the decoder layers' rematerialization mode.
    """
    path = Path(path)
    config = Qwen3Config.from_json_file(path / "config.json")
    policy = policy or DTypePolicy()
    graphdef, abstract = abstract_model(config, policy=policy, rules=rules, remat=remat)
    params = _flat_params(abstract)
    mapping = tensor_map(config)
    expected = {k: _expected_hf_shape(m, layer, params[m.ours].get_value().shape, config) for k, (m, layer) in mapping.items()}
    shardings = _flat_params(param_shardings(abstract, mesh, rules)) if mesh is not None else {}
    by_param: dict[str, list[tuple[str, int | None]]] = {}
    for key, (m, layer) in mapping.items():
        by_param.setdefault(m.ours, []).append((key, layer))

    values: dict[str, jax.Array] = {}
    with _SafetensorsDirectory(path) as files:
        _check_tensors(files, expected, config.tie_word_embeddings)
        for name, variable in params.items():
            shape, dtype = variable.get_value().shape, policy.param
            sharding = shardings[name] if mesh is not None else None
            sources = by_param[name]
            if sources[0][1] is None:  # a single tensor
                key = sources[0][0]
                host = mapping[key][0].to_ours(files.read(key), config)
                values[name] = _place(host, dtype, sharding)
            else:
                values[name] = _fill_layers(shape, dtype, sharding, mesh, sources, files, mapping, config, variable, rules)
    for name, variable in params.items():
        variable.set_value(values[name])
    model = nnx.merge(graphdef, abstract)
    log.info("loaded %s (%d tensors, %.1fM parameters)", path, len(mapping), config.num_params / 1e6)
    return model


def _place(host: np.ndarray, dtype: Any, sharding: jax.sharding.Sharding | None) -> jax.Array:
    host = np.ascontiguousarray(host)
    if sharding is None:
        return jnp.asarray(host, dtype=dtype)
    # Each device receives only its own block of the host tensor (no whole-tensor copy per device).
    return jax.make_array_from_callback(host.shape, sharding, lambda index: np.asarray(host[index], dtype=dtype))


def _fill_layers(shape, dtype, sharding, mesh, sources, files, mapping, config, variable, rules) -> jax.Array:
    """Builds a stacked [layers, ...] parameter on device, one checkpoint tensor at a time."""
    if sharding is None:
        stacked = jnp.zeros(shape, dtype)
        layer_sharding = None
    else:
        stacked = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()
        axes = variable.get_metadata()["logical_axes"][1:]
        layer_spec = logical_to_spec(axes, rules, dict(mesh.shape), shape[1:])
        layer_sharding = jax.sharding.NamedSharding(mesh, layer_spec)
    for key, layer in sources:
        host = np.ascontiguousarray(mapping[key][0].to_ours(files.read(key), config))
        piece = _place(host, host.dtype, layer_sharding)
        stacked = _set_layer(stacked, piece, jnp.int32(layer))
    return stacked


@functools.partial(jax.jit, donate_argnums=(0,))
def _set_layer(stacked: jax.Array, piece: jax.Array, index: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stacked, piece.astype(stacked.dtype), index, axis=0)


# ---------------------------------------------------------------------------------------------
# Writing


# Checkpoint files an export owns: a stale one left by an earlier export with another shard count
# would be loaded instead of (or mixed with) the new weights.
_CHECKPOINT_FILE = re.compile(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?")


def _plan_shards(params: Mapping[str, nnx.Variable], config: Qwen3Config, itemsize: int,
                 max_shard_bytes: int) -> list[dict[str, int]]:
    """Tensor name -> bytes per shard, in checkpoint order, from shapes alone (nothing is fetched).

    A shard closes before the tensor that would take it past ``max_shard_bytes``; a tensor bigger
    than that gets a shard of its own.
    """
    shards: list[dict[str, int]] = [{}]
    size = 0
    for key, (m, layer) in tensor_map(config).items():
        nbytes = math.prod(_expected_hf_shape(m, layer, params[m.ours].get_value().shape, config)) * itemsize
        if size and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = nbytes
        size += nbytes
    return shards


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _to_host(x: jax.Array) -> np.ndarray:
    """The whole value of ``x`` on this host.

    ``jax.device_get`` needs every shard in this process; an array spread over several hosts is
    all-gathered instead, a collective that every process must enter in the same order.
    """
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _hf_tensor(params: Mapping[str, nnx.Variable], source: tuple[_Mapping, int | None], config: Qwen3Config,
               dtype: Any) -> np.ndarray:
    """One checkpoint tensor on the host; of a stacked parameter only the one layer is fetched."""
    m, layer = source
    value = params[m.ours].get_value()
    piece = value if layer is None else value[layer]
    return np.ascontiguousarray(m.to_hf(_to_host(piece.astype(dtype)), config))


def _spans_processes(params: Mapping[str, nnx.Variable]) -> bool:
    """Whether some parameter lives on other processes' devices too (the export is then collective)."""
    return not all(variable.get_value().is_fully_addressable for variable in params.values())


@contextlib.contextmanager
def _staging_dir(target: Path, writer: bool) -> Iterator[Path | None]:
    """A scratch directory beside ``target`` (same filesystem, so renames into it are atomic), or
    None on processes that do not write. Removed on exit, with whatever is left in it."""
    if not writer:
        yield None
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.staging-", dir=target.parent) as staging:
        yield Path(staging)


def _publish(staging: Path, target: Path) -> None:
    """Moves every staged file into ``target`` (one atomic rename each), then deletes the checkpoint
    files of an earlier export that the new one does not have. Other files stay."""
    target.mkdir(parents=True, exist_ok=True)
    published = set()
    for staged in sorted(staging.iterdir()):
        os.replace(staged, target / staged.name)
        published.add(staged.name)
    for old in target.iterdir():
        if old.name not in published and _CHECKPOINT_FILE.fullmatch(old.name):
            old.unlink()


def _source_tokenizer(source_dir: Path | None) -> Any:
    """The tokenizer saved in ``source_dir``, or None when it has no tokenizer files."""
    if source_dir is None:
        return None
    try:
        return load_tokenizer(source_dir)
    except FileNotFoundError:
        return None


def _write_generation_config(directory: Path, config: Qwen3Config, source_dir: Path | None) -> None:
    source = None if source_dir is None else source_dir / "generation_config.json"
    if source is not None and source.is_file():
        storage.write_json(directory / source.name, storage.read_json(source))
    else:
        storage.write_json(directory / "generation_config.json", generation_config(config))


def save_checkpoint(
    model: Qwen3,
    path: str | Path,
    *,
    dtype: str | None = None,
    tokenizer: Any = None,
    source_dir: str | Path | None = None,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Writes a directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

    ``dtype`` (``"float32"``/``"bfloat16"``/``"float16"``) defaults to the parameter dtype.
    ``source_dir`` is the Hugging Face directory the model was loaded from, if any: its own
    ``generation_config.json`` is copied (otherwise a default one with the config's bos/eos ids is
    written), and its tokenizer when ``tokenizer`` (anything with ``save_pretrained``) is not given.
    Tokenizer files are written by ``tokenizer.save_tokenizer``. See the module docstring for the
    staging directory, stale files and multi-host behaviour (a collective: call on every process).
    """
    path = Path(path)
    source_dir = None if source_dir is None else Path(source_dir)
    if source_dir is not None and not source_dir.is_dir():
        raise ValueError(f"save_checkpoint: source_dir {source_dir} is not a directory")
    dtype = dtype or model.policy.param_dtype
    if dtype not in _NP_DTYPES:
        raise ValueError(f"save_checkpoint: dtype {dtype!r}; choose one of {sorted(_NP_DTYPES)}")
    np_dtype = _NP_DTYPES[dtype]
    config = model.config
    params = _flat_params(nnx.state(model, nnx.Param))
    shards = _plan_shards(params, config, np.dtype(np_dtype).itemsize, max_shard_bytes)
    names = _shard_names(len(shards))
    mapping = tensor_map(config)
    collective = _spans_processes(params)
    with _staging_dir(path, writer=jax.process_index() == 0 or not collective) as staging:
        for name, shard in zip(names, shards):
            # Every process gathers (collective); only the writer keeps a file. One shard at a time.
            tensors = {key: _hf_tensor(params, mapping[key], config, np_dtype) for key in shard}
            if staging is not None:
                storage.write_bytes(staging / name, safetensors_bytes(tensors, metadata={"format": "pt"}))
            del tensors
        if staging is not None:
            if len(shards) > 1:
                weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
                total = sum(sum(shard.values()) for shard in shards)
                storage.write_json(staging / _INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
            storage.write_json(staging / "config.json", config.to_hf(torch_dtype=dtype))
            _write_generation_config(staging, config, source_dir)
            tok = tokenizer if tokenizer is not None else _source_tokenizer(source_dir)
            if tok is not None:
                save_tokenizer(tok, staging)
            _publish(staging, path)
    if collective:  # nobody reads the export before process 0 has written it
        multihost_utils.sync_global_devices(f"expint save_checkpoint {path}")
    return path


def generation_config(config: Qwen3Config) -> dict[str, Any]:
    """The default: Qwen3's recommended non-thinking sampling, with the bos/eos ids of ``config``."""
    return {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "do_sample": True,
            "temperature": 0.7, "top_p": 0.8, "top_k": 20}
