"""``expint check-model``: load a Qwen3 checkpoint onto a mesh and prove it is the HF model.

Steps: (1) take the given Hugging Face directory, or build a tiny random Qwen3 offline when none
is given (initialized in JAX and written by our own exporter, so no PyTorch is needed); (2) load
it onto the mesh through the logical-axis rules; (3) print every parameter with its shape, dtype
and sharding; (4) compare our logits with ``transformers.Qwen3ForCausalLM`` on a random batch
(fp32). Step 4 needs PyTorch (the ``parity`` extra); ``--no-parity`` skips it. Exit status 1 when
the parity check fails, so the command doubles as a smoke test of an installation; 2 when it
cannot run (PyTorch missing, a bad ``--mesh``, a checkpoint that is missing or does not fit),
with one line naming what.

A fixed mesh (no -1, e.g. ``--mesh 2,2,2``) on a host without that many devices gets fake CPU
devices: ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` is set for N = the mesh size
before JAX starts, unless ``XLA_FLAGS`` already sets a count. On an accelerator host the flag
only affects the CPU backend, so a mesh the accelerators cannot form is still an error.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from pathlib import Path

import jax

from expint_jax.cli.errors import ArgumentParser
from expint_jax.models.config import Qwen3Config
from expint_jax.models.hf import load_checkpoint
from expint_jax.models.parity import PARITY_EXTRA_HINT, build_tiny_checkpoint, check_parity, parameter_table, torch_available
from expint_jax.parallel.mesh import MeshConfig, make_mesh


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="expint check-model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="Hugging Face Qwen3 directory (default: build a tiny random one)")
    parser.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor axis sizes; -1 = the remaining devices")
    parser.add_argument("--no-parity", action="store_true", help="skip the comparison with transformers")
    parser.add_argument("--tokens", type=int, default=16, help="sequence length of the parity batch")
    args = parser.parse_args(argv)
    if not args.no_parity and not torch_available():  # fail before minutes of loading, not after
        print(f"expint check-model: the parity check compares against transformers' PyTorch Qwen3, but PyTorch "
              f"is not installed: {PARITY_EXTRA_HINT}", file=sys.stderr)
        return 2

    try:
        data, fsdp, tensor = (int(x) for x in args.mesh.split(","))
    except ValueError:
        print(f"expint check-model: --mesh must be three comma-separated integers, got {args.mesh!r}", file=sys.stderr)
        return 2
    if args.checkpoint is not None and not (args.checkpoint / "config.json").is_file():
        print(f"expint check-model: --checkpoint {args.checkpoint}: no Hugging Face checkpoint there (no config.json)",
              file=sys.stderr)
        return 2
    fake = _fake_cpu_devices(data, fsdp, tensor)
    try:
        mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
    except ValueError as e:
        print(f"expint check-model: --mesh {args.mesh}: {e}; on a CPU, run with "
              "XLA_FLAGS=--xla_force_host_platform_device_count=8 for 8 fake devices", file=sys.stderr)
        return 2
    if fake and jax.devices()[0].platform == "cpu":
        print(f"using {fake} fake CPU devices for the {args.mesh} mesh (XLA_FLAGS={os.environ['XLA_FLAGS'].strip()})")
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = args.checkpoint or build_tiny_checkpoint(Path(scratch) / "tiny-qwen3")
        config = Qwen3Config.from_json_file(checkpoint / "config.json")
        print(f"checkpoint: {checkpoint if args.checkpoint else 'tiny random Qwen3 (built offline)'}")
        print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; mesh {dict(mesh.shape)}")
        print(f"config: layers={config.num_layers} hidden={config.hidden_size} heads={config.num_heads}/"
              f"{config.num_kv_heads} head_dim={config.head_dim} vocab={config.vocab_size} "
              f"rope_theta={config.rope_theta:g} tied={config.tie_word_embeddings}")
        start = time.perf_counter()
        model = load_checkpoint(checkpoint, mesh=mesh)
        print(f"loaded {config.num_params / 1e6:.2f}M parameters in {time.perf_counter() - start:.1f}s\n")
        rows = parameter_table(model)
        width = max(len(r[0]) for r in rows)
        print(f"{'parameter':<{width}}  {'shape':<22} {'dtype':<9} {'sharding':<36} per-device")
        for name, shape, dtype, spec, shard in rows:
            print(f"{name:<{width}}  {str(shape):<22} {dtype:<9} {spec:<36} {shard}")
        if args.no_parity:
            return 0
        with jax.set_mesh(mesh):
            result = check_parity(model, checkpoint, steps=args.tokens)
    verdict = "OK" if result.ok else "FAILED"
    print(f"\nparity vs transformers (fp32, {result.tokens} tokens): max |logit diff| = {result.max_abs_diff:.2e} "
          f"(tolerance {result.tolerance:.0e}) {verdict}")
    return 0 if result.ok else 1


def _fake_cpu_devices(data: int, fsdp: int, tensor: int) -> int:
    """Asks XLA for as many CPU devices as a fixed mesh needs (before JAX starts); returns that count, or 0."""
    sizes = (data, fsdp, tensor)
    flags = os.environ.get("XLA_FLAGS", "")
    if -1 in sizes or min(sizes) < 1 or math.prod(sizes) == 1 or "xla_force_host_platform_device_count" in flags:
        return 0
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={math.prod(sizes)}".strip()
    return math.prod(sizes)
