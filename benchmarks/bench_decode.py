"""Greedy generation throughput: our JAX sampler vs ``transformers`` ``generate``, side by side.

Both sides load the same random Qwen3 checkpoint (written once to a temporary directory), get
the same prompts (batch 8 x 256 tokens by default, no padding) and generate exactly the same
number of new tokens greedily in fp32 (no eos: ours gets no eos ids, transformers gets
``eos_token_id=None`` and ``min_new_tokens``). Each side runs in its own subprocess, so its
``ru_maxrss`` is its own peak memory (model, caches, runtime and libraries included), and the
two sides never compete for the CPU.

Timing: the first call (for JAX it includes compilation, so compile time ~ first call - median;
transformers has none) is reported apart;
"median" is over ``--runs`` further calls; tokens/s = batch * new tokens / median wall time of a
whole call (prefill + decode). The last column checks that both sides produced the same tokens.

    python benchmarks/bench_decode.py [--runs 3] [--batch 8] [--prompt 256] [--new 128]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPE = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64, vocab_size=151936, tie_word_embeddings=True)


def make_checkpoint(directory: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen3Config(**SHAPE, max_position_embeddings=4096, rms_norm_eps=1e-6)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 1e6}
    transformers.Qwen3ForCausalLM(config).eval().to(torch.float32).save_pretrained(directory)


def prompts(batch: int, length: int):
    import numpy as np

    return np.random.default_rng(0).integers(0, 151643, (batch, length))


def timed(call, runs: int) -> tuple[float, list[float], list[list[int]]]:
    start = time.perf_counter()
    tokens = call()
    first = time.perf_counter() - start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return first, times, tokens


def run_ours(args) -> dict:
    from flax import nnx

    from expint_jax.models.hf import load_checkpoint
    from expint_jax.rollout.sampler import Greedy, generate

    graphdef, state = nnx.split(load_checkpoint(args.checkpoint))
    ids = prompts(args.batch, args.prompt)

    def call():
        out = generate(graphdef, state, list(ids), strategy=Greedy(), max_new_tokens=args.new)
        return [list(g.token_ids) for g in out]

    first, times, tokens = timed(call, args.runs)
    return dict(first=first, times=times, tokens=tokens)


def run_transformers(args) -> dict:
    import torch
    import transformers

    model = transformers.Qwen3ForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    ids = torch.as_tensor(prompts(args.batch, args.prompt))

    def call():
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=args.new,
                                 min_new_tokens=args.new, eos_token_id=None, pad_token_id=0)
        return out[:, ids.shape[1]:].tolist()

    first, times, tokens = timed(call, args.runs)
    return dict(first=first, times=times, tokens=tokens)


SIDES = {"ours": run_ours, "transformers": run_transformers}


def child(args) -> None:
    result = SIDES[args.side](args)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def spawn(side: str, args, checkpoint: Path) -> dict:
    command = [sys.executable, __file__, "--side", side, "--checkpoint", str(checkpoint), "--runs", str(args.runs),
               "--batch", str(args.batch), "--prompt", str(args.prompt), "--new", str(args.new)]
    # Passive OpenMP waiting: with spinning threads, torch slows down ~10x when other processes share the cores.
    env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_WAIT_POLICY="PASSIVE")
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{side} run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        child(args)
        return

    load_before = os.getloadavg()[0]
    directory = Path(tempfile.mkdtemp(prefix="bench_decode_"))
    try:
        make_checkpoint(directory)
        results = {side: spawn(side, args, directory) for side in ("ours", "transformers")}
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    generated = args.batch * args.new
    print(f"greedy fp32, batch {args.batch}, prompt {args.prompt}, {args.new} new tokens; hidden {SHAPE['hidden_size']}, "
          f"{SHAPE['num_hidden_layers']} layers, {SHAPE['num_attention_heads']}/{SHAPE['num_key_value_heads']} heads, "
          f"vocab {SHAPE['vocab_size']}; {args.runs} timed runs; 1-min load average before: {load_before:.2f}")
    print("| side | first call (s) | median (s) | runs (s) | tokens/s | peak RSS (MiB) |")
    print("| --- | ---: | ---: | --- | ---: | ---: |")
    for side, r in results.items():
        median = statistics.median(r["times"])
        runs = ", ".join(f"{t:.2f}" for t in r["times"])
        print(f"| {side} | {r['first']:.2f} | {median:.2f} | {runs} | {generated / median:.1f} | {r['peak_rss_mib']:.0f} |")
    ours, theirs = (statistics.median(results[s]["times"]) for s in ("ours", "transformers"))
    print(f"speed-up (ours / transformers tokens/s): {theirs / ours:.2f}x; "
          f"same tokens: {results['ours']['tokens'] == results['transformers']['tokens']}; "
          f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
