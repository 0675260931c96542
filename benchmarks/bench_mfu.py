"""Model FLOPs utilization of one distillation step on an accelerator (Qwen3-1.7B, 8,192 tokens).

Analytic FLOPs per step (the convention of the distillation issue):
    tokens * (6 * N_student + 2 * N_teacher) + attention,
    attention = tokens * L * H * head_dim * T * (12 student + 4 teacher)   (full, not causal-halved)
where N counts every matmul parameter including the output projection (the embedding lookup
does no FLOPs). Our step projects only the loss positions to the vocabulary, so it executes fewer
FLOPs than this convention counts; the table therefore also reports "executed" FLOPs, where
the output projection is charged only for loss tokens, and MFU for both.

    python benchmarks/bench_mfu.py                  # Qwen3-1.7B, bf16, 1 x 8192 tokens, on the GPU
    python benchmarks/bench_mfu.py --smoke          # tiny shape on CPU: checks the script runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from expint_jax.distill.batch import DistillBatch  # noqa: E402
from expint_jax.distill.losses import Divergence  # noqa: E402
from expint_jax.distill.optim import OptimizerConfig, make_optimizer  # noqa: E402
from expint_jax.distill.step import StepConfig, init_train_state, make_train_step  # noqa: E402
from expint_jax.models.config import DTypePolicy, Qwen3Config, preset, tiny  # noqa: E402
from expint_jax.models.init import init_model  # noqa: E402
from expint_jax.parallel.mesh import MeshConfig, make_mesh  # noqa: E402
from expint_jax.parallel.placement import shard_batch  # noqa: E402

PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "cpu": None}


def matmul_params(c: Qwen3Config) -> tuple[int, int]:
    """(parameters in the transformer layers' matmuls, parameters of the output projection)."""
    per_layer = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads) + 3 * c.hidden_size * c.intermediate_size
    return c.num_layers * per_layer, c.vocab_size * c.hidden_size


def step_flops(c: Qwen3Config, tokens: int, seq: int, loss_tokens: int) -> tuple[float, float]:
    """(FLOPs by the issue's convention, FLOPs our step executes)."""
    body, head = matmul_params(c)
    attention = tokens * c.num_layers * c.num_heads * c.head_dim * seq * (12 + 4)
    convention = tokens * (6 + 2) * (body + head) + attention
    executed = tokens * 8 * body + loss_tokens * 8 * head + attention
    return float(convention), float(executed)


def synthetic_batch(rows: int, seq: int, loss_fraction: float, vocab: int, seed: int = 0) -> DistillBatch:
    """Teacher and student rows of equal length; the last ``loss_fraction`` of each row carries loss."""
    rng = np.random.default_rng(seed)
    student = rng.integers(0, vocab, size=(rows, seq)).astype(np.int32)
    teacher = student.copy()
    teacher[:, : seq // 8] = rng.integers(0, vocab, size=(rows, seq // 8))  # a different "experience" prefix
    n = int(seq * loss_fraction)
    index = np.broadcast_to(np.arange(seq - n - 1, seq - 1, dtype=np.int32), (rows, n)).copy()
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy()
    return DistillBatch(
        student_ids=student, student_valid=np.ones((rows, seq), bool), teacher_ids=teacher.astype(np.int32),
        teacher_positions=positions, teacher_branch=np.zeros((rows, seq), np.int32), teacher_attach=positions,
        teacher_valid=np.ones((rows, seq), bool), student_loss_index=index, teacher_loss_index=index,
        targets=np.take_along_axis(student, index + 1, axis=1), weights=np.ones((rows, n), np.float32),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="Qwen3-1.7B")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--loss-fraction", type=float, default=0.25)
    parser.add_argument("--remat", default="dots", choices=["none", "dots", "full"])
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device's dense bf16 peak")
    parser.add_argument("--smoke", action="store_true", help="tiny shape on whatever device there is")
    args = parser.parse_args()

    config = tiny(hidden_size=64, num_layers=2) if args.smoke else preset(args.preset)
    seq = 256 if args.smoke else args.seq
    policy = DTypePolicy("float32", "bfloat16")
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    with jax.set_mesh(mesh):
        student = init_model(config, mesh=mesh, policy=policy, remat=args.remat, seed=0)
        teacher = init_model(config, mesh=mesh, policy=policy, remat="none", seed=0)
        tx, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-5, total_steps=100))
        graphdef, state = init_train_state(student, tx)
        step = make_train_step(graphdef, tx, schedule,
                               StepConfig(Divergence("forward_kl"), chunk_size=args.chunk))
        teacher_params = nnx.state(teacher, nnx.Param)
        batch = shard_batch(synthetic_batch(args.rows, seq, args.loss_fraction, config.vocab_size), mesh)
        start = time.perf_counter()
        state, metrics = step(state, teacher_params, batch)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            state, metrics = step(state, teacher_params, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
    device = jax.devices()[0]
    kind = device.device_kind.lower()
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
    tokens = args.rows * seq
    convention, executed = step_flops(config, tokens, seq, int(tokens * args.loss_fraction))
    median = statistics.median(times)
    print(f"# {args.preset if not args.smoke else 'tiny (smoke)'}: {args.rows} x {seq} tokens, bf16 compute, "
          f"remat={args.remat}, chunk={args.chunk}; device {device.device_kind} x {jax.device_count()}")
    print("| step s (median) | tokens/s | TFLOP/s (convention) | TFLOP/s (executed) | MFU (convention) | MFU (executed) | compile s |")
    print("|---|---|---|---|---|---|---|")
    conv_tflops, exec_tflops = convention / median / 1e12, executed / median / 1e12
    mfu = (lambda t: f"{100 * t / (peak * jax.device_count()):.1f}%") if peak else (lambda t: "n/a")
    print(f"| {median:.3f} | {tokens / median:,.0f} | {conv_tflops:.1f} | {exec_tflops:.1f} | {mfu(conv_tflops)} | "
          f"{mfu(exec_tflops)} | {compile_s:.1f} |")
    print(f"# loss {float(metrics['loss']):.4f}; {args.repeats} timed steps")


if __name__ == "__main__":
    main()
