"""Compile-time memory checks: the train step and the sampler compiled from shapes alone on the fake
8-device mesh. Fast tests at a tiny shape check what the figures count (the sharded state, the
donated buffers, the KV cache); the slow tests compile the paper configs' Qwen3-4B and Qwen3-8B
programs at 32K tokens and assert that they fit a TPU v5p (95 GB) and an H100 (80 GB) per device.
"""

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from benchmarks.bench_compile_memory import measure, paper_programs
from expint_jax.analysis.compiled_memory import (
    H100, V5P, CompiledMemory, MemoryBudgetExceeded, SamplerCase, TrainCase, abstract_batch, abstract_params,
    check_fits, compile_sampler, compile_train_step)
from expint_jax.distill.batch import SIGNAL_FIELDS, BatchShape
from expint_jax.distill.losses import Divergence
from expint_jax.distill.optim import OptimizerConfig, make_optimizer
from expint_jax.distill.step import StepConfig
from expint_jax.llm.sampler.sampling import Penalties, TopP
from expint_jax.models.config import DTypePolicy, tiny
from expint_jax.parallel.mesh import MeshConfig, make_mesh
from expint_jax.parallel.rules import DEFAULT_RULES

REPO = Path(__file__).resolve().parents[2]
MODEL = tiny(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16,
             vocab_size=1024)
POLICY = DTypePolicy("float32", "bfloat16")
MESH = MeshConfig(data=1, fsdp=4, tensor=2)
SHAPE = BatchShape(rows=8, student_tokens=512, teacher_tokens=1024, loss_tokens=256)


def _device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (device 0's shards)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _scalar_bytes(tree) -> int:
    return sum(np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree) if x.shape == ())


def _train_inputs(shape: BatchShape):
    """Per-device bytes of the parameters, of the optimizer state's scalars (step counts) and of the batch."""
    mesh = make_mesh(MESH)
    _, params = abstract_params(MODEL, mesh, policy=POLICY, rules=DEFAULT_RULES)
    tx, _ = make_optimizer(OptimizerConfig())
    counts = _scalar_bytes(jax.eval_shape(tx.init, params))
    return params, counts, _device_bytes(abstract_batch(shape, mesh, DEFAULT_RULES))


def test_train_step_figures_count_the_sharded_state_teacher_and_batch_and_the_state_is_donated():
    memory = compile_train_step(TrainCase("tiny", MODEL, MESH, SHAPE, StepConfig(micro_batches=2), POLICY,
                                          remat="full"))
    params, counts, batch_bytes = _train_inputs(SHAPE)
    param_bytes = _device_bytes(params)
    whole = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
    assert param_bytes < whole / 4  # the parameters really are spread over the 8 devices
    # Student, Adam's two moments placed like it (not replicated), the frozen teacher, the optimizer's
    # step counts, the train state's step, and the batch fields the step reads (jit drops unused
    # arguments, e.g. the targets, which only the nll and sampled losses read).
    state_bytes = 4 * param_bytes + counts + 4
    assert state_bytes < memory.argument_bytes <= state_bytes + batch_bytes
    assert memory.alias_bytes >= 3 * param_bytes  # the donated state is updated in place
    assert memory.temp_bytes > 0 and memory.peak_bytes == (memory.argument_bytes + memory.output_bytes
                                                           - memory.alias_bytes + memory.temp_bytes)


def test_from_rollout_step_holds_no_teacher_but_the_signal():
    step = StepConfig(Divergence("topk", top_k=8), micro_batches=2, teacher="from_rollout")
    signal_shape = dataclasses.replace(SHAPE, signal_k=8)
    memory = compile_train_step(TrainCase("tiny signal", MODEL, MESH, signal_shape, step, POLICY, remat="full"))
    params, counts, batch_bytes = _train_inputs(signal_shape)
    signal = abstract_batch(signal_shape, make_mesh(MESH), DEFAULT_RULES)
    signal_bytes = _device_bytes([getattr(signal, name) for name in SIGNAL_FIELDS])
    state_bytes = 3 * _device_bytes(params) + counts + 4  # no teacher parameters
    assert state_bytes + signal_bytes <= memory.argument_bytes <= state_bytes + batch_bytes
    with pytest.raises(ValueError, match="needs shape.signal_k > 0"):
        TrainCase("tiny", MODEL, MESH, SHAPE, step)


def test_sampler_decode_takes_the_prefill_cache_sharded_by_rows_and_donated():
    case = SamplerCase("tiny", MODEL, MESH, rows=8, prompt_tokens=512, max_new=64, slots=768,
                       strategy=TopP(0.95, 0.7), penalties=Penalties(1.1, 0.0), top_logprobs=4, policy=POLICY)
    prefill, decode = compile_sampler(case)
    c = MODEL
    # bfloat16 keys and values of every layer, rows spread over fsdp (4), KV heads over tensor (2).
    cache_bytes = 2 * c.num_layers * (case.rows // 4) * (c.num_kv_heads // 2) * case.slots * c.head_dim * 2
    assert cache_bytes <= prefill.output_bytes < cache_bytes + 10**6
    assert decode.alias_bytes >= cache_bytes  # the loop writes into the donated cache
    assert prefill.compile_seconds > 0 and decode.temp_bytes > 0
    with pytest.raises(ValueError, match="do not fit 512 cache slots"):
        dataclasses.replace(case, slots=512)


def test_check_fits_names_the_budget_and_every_figure():
    memory = CompiledMemory("train step x", argument_bytes=30 * 10**9, output_bytes=20 * 10**9,
                            alias_bytes=20 * 10**9, temp_bytes=55 * 10**9, compile_seconds=3.0)
    check_fits(memory, V5P)  # 85 GB
    with pytest.raises(MemoryBudgetExceeded, match=r"does not fit H100 \(80 GB per device\): train step x: .*"
                                                   r"temporaries 55.00 GB, total 85.00 GB"):
        check_fits(memory, H100)


def test_paper_programs_are_the_configs_largest_shapes():
    p = paper_programs("qwen3_4b", "v5p-8")
    assert (p.train.mesh.data, p.train.mesh.fsdp, p.train.mesh.tensor) == (1, 4, 1) and p.budget == V5P
    assert p.train.shape == BatchShape(128, 32768, 65536, 32768)
    assert p.train.step.micro_batches == 32 and p.train.remat == "full" and p.train.step.teacher == "recompute"
    assert p.train.model.num_layers == 36 and p.train.model.hidden_size == 2560
    assert p.train_from_rollout.step.teacher == "from_rollout" and p.train_from_rollout.shape.signal_k == 64
    assert (p.sampler.rows, p.sampler.prompt_tokens, p.sampler.max_new, p.sampler.slots) == (16, 32768, 4096, 49152)
    assert p.sampler.penalties == Penalties(1.1, 0.0) and p.sampler_with_signal.top_logprobs == 64
    h100 = paper_programs("qwen3_8b", "8xh100")
    assert h100.budget == H100 and h100.train.model.num_layers == 36 and h100.train.model.hidden_size == 4096
    assert (h100.train.mesh.fsdp, h100.train.mesh.tensor, h100.train.step.micro_batches) == (4, 2, 32)
    assert paper_programs("qwen3_4b", "8xh100", mesh=(1, 2, 4)).train.mesh == MeshConfig(1, 2, 4)


# Qwen3-8B runs on fsdp x tensor meshes there (qwen3_8b.LAYOUTS): (1, 2, 2) and (1, 4, 2).
PAPER_CELLS = [("qwen3_4b", "v5p-8"), ("qwen3_4b", "8xh100"), ("qwen3_8b", "v5p-8"), ("qwen3_8b", "8xh100")]


@pytest.mark.slow
@pytest.mark.parametrize("model, target", PAPER_CELLS)
def test_paper_programs_compile_at_32k_tokens_and_fit_the_chip(model, target):
    programs = paper_programs(model, target)
    layout = programs.train.mesh
    devices = jax.devices()[:layout.data * layout.fsdp * layout.tensor]
    for _, _, memory in measure(programs, devices):
        print(memory.summary())
        check_fits(memory, programs.budget)


@pytest.mark.slow
def test_the_script_compiles_the_v5p_32_pod_on_16_fake_devices():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the script asks for 16 devices itself
    out = subprocess.run([sys.executable, "benchmarks/bench_compile_memory.py", "--models", "qwen3_8b",
                          "--targets", "v5p-32"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| qwen3_8b | v5p-32 | 2, 8, 1 |")]
    assert len(rows) == 5 and all(row.split("|")[11].strip() == "yes" for row in rows), out.stdout
