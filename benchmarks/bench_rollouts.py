"""SimWeb agent rollouts per second: ``ReActAgent`` on the local engine vs the scripted reference policy.

One call is ``ReActAgent.run_batch`` on ``--tasks`` SimWeb tasks x ``--n`` rollouts, step-wise
injection with the BM25 selector over a small pool, seeded, so every call does the same work.

  * ``local``: ``LocalEngine`` serving a random Qwen3 built in JAX (hidden ``--hidden``,
    ``--layers`` layers, the real 151,936-token vocabulary) with the offline Qwen3 tokenizer.
    Every call generates at most ``--max-tokens`` tokens per turn and makes ``--calls`` LLM calls
    per rollout (a random model writes neither tool calls nor answers, and ``max_no_action_turns``
    is above ``--calls``, so its rollouts end at ``max_calls``). The warm-up call holds JAX's
    compilation of every prompt/cache shape the timed calls meet.
  * ``reference``: the same agent, tools and limits with ``ReferencePolicy`` (the scripted SimWeb
    agent as a chat backend, no model): the cost of the agent loop, selection and tools alone, so
    the ratio is what the model costs.

The harness table (``common.main_side_by_side``) gives rollouts/s and the ratio. A second table
gives, per side, assistant turns/s and generated tokens/s (medians over the timed calls, each
worker logging its own calls) with turns and tokens per rollout and the terminations; a last
line gives SimWeb's task-generation rate (``--gen-tasks`` tasks, world included, median of 3).

    python benchmarks/bench_rollouts.py --rounds 2 --repeats 3
    python benchmarks/bench_rollouts.py --smoke --rounds 1 --repeats 1     # a quick check
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import is_worker, main_side_by_side, prepare_environment, script_arguments  # noqa: E402

STATS = "EXPINT_BENCH_ROLLOUT_STATS"  # the file workers append one line per timed call to
POOL = {
    "G0": "When a search result is the entity's own page, visit it before answering.",
    "G1": "When a question names a site, start from its root URL and follow the directory links.",
    "G2": "When two values must be compared, read both pages before computing the difference.",
    "G3": "When the answer is a number, give only the number with no units or words around it.",
    "G4": "When a page lists a related entity, follow its link for multi-hop questions.",
    "G5": "When a search returns nothing useful, search again with the exact entity name.",
}


def add_arguments(parser):
    parser.add_argument("--tasks", type=int, default=8, help="SimWeb tasks per call (a mix of levels)")
    parser.add_argument("--n", type=int, default=1, help="rollouts per task")
    parser.add_argument("--calls", type=int, default=4, help="max LLM calls per rollout")
    parser.add_argument("--max-tokens", type=int, default=32, help="max new tokens per assistant turn")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--gen-tasks", type=int, default=3000, help="tasks generated for the generation rate")
    parser.add_argument("--smoke", action="store_true", help="a tiny workload, to check the script runs")


def workload(args):
    """The arguments with ``--smoke`` applied."""
    if not args.smoke:
        return args
    return argparse.Namespace(**{**vars(args), "tasks": 2, "n": 1, "calls": 2, "max_tokens": 4, "gen_tasks": 60})


def _env_and_tasks(args):
    from expint_jax.rollout.envs.simweb import SimWebConfig, SimWebEnv

    env = SimWebEnv(SimWebConfig(seed=0, split="bench", tasks_per_level=args.tasks))
    by_level = collections.defaultdict(list)
    for task in env.tasks():
        by_level[task.metadata["level"]].append(task)
    mixed = [task for group in zip(*by_level.values()) for task in group]  # easy, medium, hard, easy, ...
    return env, mixed[: args.tasks]


def _side(args, backend):
    """The timed call for ``backend``: one seeded ``run_batch``; timed calls are logged to ``STATS``."""
    from expint_jax.experience.inject import StepwiseInjection
    from expint_jax.experience.select import BM25Selector
    from expint_jax.records import SamplingParams
    from expint_jax.rollout.agent import AgentConfig, ReActAgent

    env, tasks = _env_and_tasks(args)
    config = AgentConfig(max_llm_calls=args.calls, max_no_action_turns=args.calls + 1,
                         sampling=SamplingParams(temperature=0.7, max_tokens=args.max_tokens))
    agent = ReActAgent(backend, config, StepwiseInjection(POOL, BM25Selector(k=3, k_min=2)))
    calls = 0

    def run():
        nonlocal calls
        start = time.perf_counter()
        trajectories = agent.run_batch(tasks, env, n=args.n, seed=0)
        seconds = time.perf_counter() - start
        calls += 1
        if calls > 1 and os.environ.get(STATS):  # the first call is the harness's untimed warm-up
            record = {
                "side": args.worker, "seconds": seconds, "rollouts": len(trajectories),
                "turns": sum(t.num_assistant_turns for t in trajectories),
                "tokens": sum(t.metadata.get("completion_tokens", 0) for t in trajectories),
                "terminations": collections.Counter(t.termination for t in trajectories),
            }
            with open(os.environ[STATS], "a") as f:
                f.write(json.dumps(record) + "\n")
        return trajectories

    return run


def local(args):
    from flax import nnx

    from expint_jax.models.config import tiny
    from expint_jax.models.qwen3 import Qwen3
    from expint_jax.models.tokenizer import load_tokenizer
    from expint_jax.llm.local import LocalEngine

    args = workload(args)
    config = tiny(hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_layers=args.layers,
                  num_heads=max(args.hidden // 32, 1), num_kv_heads=max(args.hidden // 64, 1), head_dim=32)
    engine = LocalEngine(Qwen3(config, rngs=nnx.Rngs(0)), load_tokenizer(None), max_batch_size=8)
    return _side(args, engine)


def reference(args):
    from expint_jax.rollout.envs.simweb.reference_agent import ReferencePolicy

    return _side(workload(args), ReferencePolicy())


def report_rates(path: str) -> None:
    """The second table: turns and tokens per second, from the workers' logged calls."""
    records = collections.defaultdict(list)
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            records[record["side"]].append(record)
    print("| side | rollouts/s | assistant turns/s | generated tokens/s | turns/rollout | tokens/turn | terminations |")
    print("|---|---|---|---|---|---|---|")
    for side, calls in records.items():
        def median_rate(key, calls=calls):
            return statistics.median(c[key] / c["seconds"] for c in calls)

        last = calls[-1]
        terminations = ", ".join(f"{k} {v}" for k, v in sorted(last["terminations"].items()))
        tokens_per_turn = f"{last['tokens'] / last['turns']:.1f}" if last["tokens"] else "-"
        tokens = f"{median_rate('tokens'):,.0f}" if last["tokens"] else "- (no model)"
        print(f"| {side} | {median_rate('rollouts'):,.2f} | {median_rate('turns'):,.1f} | {tokens} | "
              f"{last['turns'] / last['rollouts']:.1f} | {tokens_per_turn} | {terminations} |")


def report_generation_rate(args) -> None:
    from expint_jax.rollout.envs.simweb import SimWebConfig, SimWebEnv

    per_level = math.ceil(args.gen_tasks / 3)
    times = []
    for seed in range(3):  # a new seed each time: nothing is cached between generations
        start = time.perf_counter()
        count = len(SimWebEnv(SimWebConfig(seed=100 + seed, tasks_per_level=per_level)).tasks())
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(f"# SimWeb task generation (sites + tasks, 3 levels): {count:,} tasks in {median:.2f} s "
          f"(median of 3) = {count / median:,.0f} tasks/s")


if __name__ == "__main__":
    prepare_environment(passive_openmp=True)
    worker = is_worker()
    stats = None
    if not worker:
        stats = tempfile.NamedTemporaryFile(prefix="bench_rollouts-", suffix=".jsonl", delete=False).name
        os.environ[STATS] = stats  # inherited by the workers
    main_side_by_side(
        "SimWeb agent rollouts (ReActAgent.run_batch, step-wise BM25 injection): local=LocalEngine + random "
        "Qwen3, reference=scripted ReferencePolicy (no model)",
        {"local": local, "reference": reference},
        add_arguments,
        lambda a: (workload(a).tasks * workload(a).n, "rollouts"),
        reference="reference",
    )
    if not worker:
        args = workload(script_arguments(add_arguments))
        report_rates(stats)
        os.remove(stats)
        report_generation_rate(args)
