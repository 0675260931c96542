"""SimWeb agent rollouts per second on the local engine: the engine as it was (``before``) vs now (``after``).

One call is ``ReActAgent.run_batch`` on ``--tasks`` SimWeb tasks (easy and medium by default) x
``--n`` rollouts, step-wise injection with the BM25 selector over a small pool, seeded: every call
does the same work.

The model is an organism-sized random Qwen3 (hidden 128, 4 layers, 4 heads of 32, 2 KV heads, MLP
512, vocabulary 8,192, tied embeddings, fp32) or a checkpoint (``--checkpoint``). The random model's
embedding is scaled by ``--logit-scale`` (20), so that its next-token distributions are peaked as a
trained model's are (a random model's are nearly flat, which sends top-p down its slow path for
every token; ``--logit-scale 1`` measures that case), and the rows of the end-of-turn tokens are
zeroed, so every turn generates ``--max-tokens`` tokens on both sides. A random model
writes neither tool calls nor answers, so its own rollouts would be short nudge loops; instead the
rollouts *replay* the scripted SimWeb agent (``ReferencePolicy``): each request goes to the engine,
which prefills it and samples up to ``--max-tokens`` tokens with the agent's sampling (the release's
temperature 0.7, top-p 0.95, presence penalty 1.1), and then the scripted agent's reply is what the
agent stores. So the engine sees exactly the prompts a policy acting like the scripted agent would
send (3-6 turns, real pages and tool results, a step-wise block in every request) and does all of
its work; only its own replies are thrown away. Under step-wise injection this costs the prefix
cache nothing: a next request shares with the previous one only the prefix before the block, which
sits before the reply anyway. ``--act`` lets the model's own replies drive the rollouts instead.

The tokenizer is the organism's kind of sub-vocabulary of Qwen3's (``models.subvocab``) built on
the workload's text; on that text it tokenizes exactly as Qwen3 does, so prompt lengths are Qwen3's.
The model keeps ``--vocab`` output rows (more than the tokenizer's ids; the rest are never prompted).

Sides (each in its own process, rounds interleaved):
  * ``before``: the code of ``--before-ref`` (the main branch before this work), exported from git
    into a temporary directory and imported in place of this tree's ``expint_jax``;
  * ``after``: this tree (prefix cache on);
  * ``scripted``: the scripted agent alone, no model: the cost of the agent loop, selection and tools.

Besides the harness table (rollouts/s, peak RSS, warm-up), a second table gives per side the time
in prefill, decode and the rest, prefill tokens/s (real tokens; the slots column counts the padded
ones), decode tokens/s, the number of XLA compilations and their time (all in the warm-up call: the
timed calls compiled nothing), and for ``after`` the prefix cache's share of prompt tokens.

    python benchmarks/bench_rollouts.py --rounds 1 --repeats 2
    python benchmarks/bench_rollouts.py --smoke --rounds 1 --repeats 1     # a quick check
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import is_worker, main_side_by_side, prepare_environment, script_arguments  # noqa: E402

STATS = "EXPINT_BENCH_ROLLOUT_STATS"  # the file workers append one line per timed call to
BEFORE_TREE = "EXPINT_BENCH_BEFORE_TREE"  # where the parent exported --before-ref's expint_jax
TOKENIZER_DIR = "EXPINT_BENCH_TOKENIZER"  # the sub-vocabulary tokenizer the parent built, for both engines
POOL = {
    "G0": "When a search result is the entity's own page, visit it before answering.",
    "G1": "When a question names a site, start from its root URL and follow the directory links.",
    "G2": "When two values must be compared, read both pages before computing the difference.",
    "G3": "When the answer is a number, give only the number with no units or words around it.",
    "G4": "When a page lists a related entity, follow its link for multi-hop questions.",
    "G5": "When a search returns nothing useful, search again with the exact entity name.",
}


def add_arguments(parser):
    parser.add_argument("--tasks", type=int, default=64, help="SimWeb tasks per call (levels interleaved)")
    parser.add_argument("--n", type=int, default=2, help="rollouts per task")
    parser.add_argument("--levels", default="easy,medium")
    parser.add_argument("--calls", type=int, default=8, help="max LLM calls per rollout")
    parser.add_argument("--max-tokens", type=int, default=56,
                        help="max new tokens per turn (the scripted agent's turns average 56 Qwen3 tokens)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--mlp", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--max-batch-size", type=int, default=8, help="LocalEngine micro-batch rows")
    parser.add_argument("--logit-scale", type=float, default=20.0,
                        help="the random model's (tied) embedding is scaled by this (module docstring)")
    parser.add_argument("--checkpoint", default=None, help="a Qwen3 checkpoint directory instead of a random model")
    parser.add_argument("--act", action="store_true", help="the model's replies drive the rollouts (no replay)")
    parser.add_argument("--before-ref", default="1b763c8", help="git revision whose engine is the 'before' side")
    parser.add_argument("--gen-tasks", type=int, default=3000, help="tasks generated for the generation rate")
    parser.add_argument("--smoke", action="store_true", help="a tiny workload, to check the script runs")


def workload(args):
    """The arguments with ``--smoke`` applied."""
    if not args.smoke:
        return args
    small = dict(tasks=2, n=1, calls=3, max_tokens=4, hidden=64, layers=2, mlp=128, gen_tasks=60)
    return argparse.Namespace(**{**vars(args), **small})


def _env_and_tasks(args):
    from expint_jax.rollout.envs.simweb import SimWebConfig, SimWebEnv

    levels = tuple(args.levels.split(","))
    env = SimWebEnv(SimWebConfig(seed=0, split="bench", tasks_per_level=math.ceil(args.tasks / len(levels)),
                                 levels=levels))
    by_level = collections.defaultdict(list)
    for task in env.tasks():
        by_level[task.metadata["level"]].append(task)
    mixed = [task for group in zip(*by_level.values()) for task in group]  # easy, medium, easy, ...
    return env, mixed[: args.tasks]


def _agent(args, backend):
    from expint_jax.experience.inject import StepwiseInjection
    from expint_jax.experience.select import BM25Selector
    from expint_jax.rollout.agent import RELEASE_SAMPLING, AgentConfig, ReActAgent

    config = AgentConfig(max_llm_calls=args.calls, sampling=dataclasses.replace(RELEASE_SAMPLING,
                                                                                max_tokens=args.max_tokens))
    return ReActAgent(backend, config, StepwiseInjection(POOL, BM25Selector(k=3, k_min=2)))


class Replay:
    """A chat backend whose replies are the scripted agent's, after the engine has done the work of
    every request (module docstring)."""

    def __init__(self, engine, script):
        self.engine, self.script = engine, script
        self.count_tokens = engine.count_tokens

    def chat(self, conversations, params):
        if conversations:
            self.engine.chat(conversations, params)
        return self.script.chat(conversations, params)


def workload_texts(args) -> list[str]:
    """Every text of the scripted rollouts of the workload: the sub-vocabulary's corpus."""
    from expint_jax.rollout import prompts
    from expint_jax.rollout.envs.simweb.reference_agent import ReferencePolicy

    class Recorder:
        def __init__(self):
            self.texts = set(POOL.values()) | {prompts.NO_ACTION_NUDGE, prompts.FORCED_ANSWER}
            self.script = ReferencePolicy()

        def chat(self, conversations, params):
            self.texts.update(m.content for c in conversations for m in c)
            return self.script.chat(conversations, params)

    recorder = Recorder()
    env, tasks = _env_and_tasks(args)
    _agent(args, recorder).run_batch(tasks, env, n=args.n, seed=0)
    return sorted(recorder.texts)


class Instruments:
    """Times the sampler's jitted prefill, extend and decode (and the prefix cache's copies) and counts
    XLA compilations, by wrapping the module functions that ``generate`` looks up at call time."""

    def __init__(self):
        import jax

        from expint_jax.llm.sampler import generation

        self.seconds = collections.Counter()
        self.tokens = collections.Counter()
        self.compiles = collections.Counter()
        self.compile_seconds = collections.Counter()  # by jitted function
        self.generation = generation
        self.functions = {name: getattr(generation, name) for name in ("prefill", "extend", "decode")
                          if hasattr(generation, name)}
        for name, fn in self.functions.items():
            setattr(generation, name, self._timed(name, fn))
        with contextlib.suppress(ImportError):
            from expint_jax.llm.sampler import prefix_cache

            for name in ("_gather", "_scatter"):
                self.functions[name] = getattr(prefix_cache, name)
                setattr(prefix_cache, name, self._timed("cache copies", self.functions[name]))

        def listen(event, duration, **kwargs):
            if event == "/jax/core/compile/backend_compile_duration":
                self.compile_seconds[str(kwargs.get("fun_name", "?"))] += duration

        jax.monitoring.register_event_duration_secs_listener(listen)

    def _timed(self, kind, fn):
        import jax

        def run(*args, **kwargs):
            start = time.perf_counter()
            out = jax.block_until_ready(fn(*args, **kwargs))
            self.seconds["prefill" if kind in ("prefill", "extend") else kind] += time.perf_counter() - start
            if kind in ("prefill", "extend"):
                ids, valid = args[-3], args[-1]  # (..., ids, positions, valid)
                self.tokens["prefill"] += int(valid.sum())
                self.tokens["prefill slots"] += int(ids.size)
            elif kind == "decode":
                self.tokens["decode"] += int(out[0].lengths.sum())
            return out

        return run

    def compile_counts(self) -> dict[str, int]:
        return {name: fn._cache_size() for name, fn in self.functions.items()}

    def take(self) -> dict:
        """What was measured since the last ``take``."""
        record = dict(seconds_by=dict(self.seconds), tokens=dict(self.tokens),
                      compile_seconds=sum(self.compile_seconds.values()),
                      compile_seconds_by={k: round(v, 1) for k, v in self.compile_seconds.most_common(6)})
        for counter in (self.seconds, self.tokens, self.compile_seconds):
            counter.clear()
        return record


def _side(args, backend, instruments=None, engine=None):
    """The timed call: one seeded ``run_batch``; timed calls are logged to ``STATS``."""
    env, tasks = _env_and_tasks(args)
    agent = _agent(args, backend)
    cache = getattr(engine, "prefix_cache", None)  # the 'before' engine has none
    calls = 0

    def run():
        nonlocal calls
        if cache is not None:
            cache.clear()  # every call is a fresh stage: nothing cached from the last one
        start = time.perf_counter()
        trajectories = agent.run_batch(tasks, env, n=args.n, seed=0)
        seconds = time.perf_counter() - start
        calls += 1
        measured = instruments.take() if instruments else {}
        if calls == 1 and instruments:
            warmup["compiles_by"] = instruments.compile_counts()
            warmup["compiles"] = sum(warmup["compiles_by"].values())
            warmup["compile_seconds"] = measured["compile_seconds"]
            warmup["compile_seconds_by"] = measured["compile_seconds_by"]
        elif os.environ.get(STATS):  # the first call is the harness's untimed warm-up
            record = {
                "side": args.worker, "seconds": seconds, "rollouts": len(trajectories),
                "turns": sum(t.num_assistant_turns for t in trajectories), **measured, **warmup,
                "prefix_cache_mib": (cache.arena_tokens * cache.token_bytes(cache.config, cache.dtype) / 2**20
                                     if cache is not None else None),
                "new_compiles": sum(instruments.compile_counts().values()) - warmup["compiles"] if instruments else 0,
            }
            counters = getattr(engine, "counters", None)
            if counters is not None:
                record["prompt_tokens"], record["reused_tokens"] = counters.prompt_tokens, counters.reused_tokens
                counters.prompt_tokens = counters.reused_tokens = 0
            with open(os.environ[STATS], "a") as f:
                f.write(json.dumps(record) + "\n")
        return trajectories

    warmup = {}
    return run


def _engine_side(args):
    """``before`` or ``after``: the engine of the imported ``expint_jax`` behind the replay backend."""
    from flax import nnx

    import numpy as np

    from expint_jax.llm.local import LocalEngine
    from expint_jax.models.chat import ChatFormat
    from expint_jax.models.config import tiny
    from expint_jax.models.qwen3 import Qwen3
    from expint_jax.models.tokenizer import load_tokenizer
    from expint_jax.rollout.envs.simweb.reference_agent import ReferencePolicy

    args = workload(args)
    instruments = Instruments()
    if args.checkpoint:
        engine = LocalEngine.from_checkpoint(args.checkpoint, max_batch_size=args.max_batch_size)
    else:
        config = tiny(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
                      num_layers=args.layers, num_heads=max(args.hidden // 32, 1),
                      num_kv_heads=max(args.hidden // 64, 1), head_dim=32, max_position_embeddings=8192)
        tokenizer = load_tokenizer(os.environ[TOKENIZER_DIR])
        model = Qwen3(config, rngs=nnx.Rngs(0))
        chat = ChatFormat(tokenizer)
        table = model.embed[...] * args.logit_scale
        model.embed[...] = table.at[np.asarray([*chat.eos_ids, chat.pad_id])].set(0.0)  # turns end at max-tokens
        engine = LocalEngine(model, tokenizer, max_batch_size=args.max_batch_size)
    backend = engine if args.act else Replay(engine, ReferencePolicy())
    return _side(args, backend, instruments, engine)


def before(args):
    tree = os.environ[BEFORE_TREE]
    if "expint_jax" in sys.modules:
        raise RuntimeError("expint_jax was imported before the 'before' tree could replace it")
    sys.path.insert(0, tree)
    import expint_jax

    assert Path(expint_jax.__file__).is_relative_to(tree), expint_jax.__file__
    return _engine_side(args)


def after(args):
    return _engine_side(args)


def scripted(args):
    from expint_jax.rollout.envs.simweb.reference_agent import ReferencePolicy

    return _side(workload(args), ReferencePolicy())


def save_subvocabulary_tokenizer(args) -> str:
    """Builds the sub-vocabulary tokenizer of the workload's text (this tree's ``models.subvocab``;
    the 'before' revision may predate it) and saves it into a temporary directory."""
    from expint_jax.models.subvocab import SubVocabulary
    from expint_jax.models.tokenizer import load_tokenizer, save_tokenizer

    qwen = load_tokenizer(None)
    directory = tempfile.mkdtemp(prefix="bench_rollouts_tokenizer-")
    subvocabulary = SubVocabulary.from_corpus(qwen, workload_texts(args), max_tokens=args.vocab)
    if subvocabulary.padded_size > args.vocab:
        raise SystemExit(f"the workload's text needs {subvocabulary.padded_size} token ids; --vocab is {args.vocab}")
    save_tokenizer(subvocabulary.tokenizer(qwen), directory)
    return directory


def export_tree(ref: str) -> str:
    """``ref``'s ``expint_jax`` package, exported from this repository into a temporary directory."""
    repo = Path(__file__).resolve().parents[1]
    directory = tempfile.mkdtemp(prefix="bench_rollouts_before-")
    archive = subprocess.run(["git", "-C", str(repo), "archive", ref, "expint_jax"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", directory], input=archive.stdout, check=True)
    return directory


def report(path: str) -> None:
    """The second table, from the workers' logged calls (medians over the timed calls)."""
    records = collections.defaultdict(list)
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            records[record["side"]].append(record)
    print("| side | rollouts/s | prefill s | decode s | rest s | prefill tokens/s (slots/s) | decode tokens/s | "
          "turns/rollout | prompt tokens reused | compiles (s), all in the warm-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for side, calls in records.items():
        def median(f, calls=calls):
            return statistics.median(f(c) for c in calls)

        last = calls[-1]
        rate = median(lambda c: c["rollouts"] / c["seconds"])
        if "seconds_by" not in last:
            print(f"| {side} | {rate:,.2f} | - | - | {median(lambda c: c['seconds']):.1f} | - | - | "
                  f"{last['turns'] / last['rollouts']:.2f} | - | - |")
            continue
        secs = {k: median(lambda c, k=k: c["seconds_by"].get(k, 0.0)) for k in ("prefill", "decode", "cache copies")}
        rest = median(lambda c: c["seconds"] - sum(c["seconds_by"].values()))
        prefill_rate = median(lambda c: c["tokens"].get("prefill", 0) / c["seconds_by"]["prefill"])
        slot_rate = median(lambda c: c["tokens"].get("prefill slots", 0) / c["seconds_by"]["prefill"])
        decode_rate = median(lambda c: c["tokens"].get("decode", 0) / c["seconds_by"]["decode"])
        reused = (f"{last['reused_tokens'] / last['prompt_tokens']:.0%} of {last['prompt_tokens']:,}"
                  if last.get("prompt_tokens") else "-")
        copies = f" + {secs['cache copies']:.1f} cache copies" if secs["cache copies"] else ""
        new = f", {last['new_compiles']} more in timed calls" if last.get("new_compiles") else ""
        print(f"| {side} | {rate:,.2f} | {secs['prefill']:.1f} | {secs['decode']:.1f} | {rest:.1f}{copies} | "
              f"{prefill_rate:,.0f} ({slot_rate:,.0f}) | {decode_rate:,.0f} | {last['turns'] / last['rollouts']:.2f} | "
              f"{reused} | {last['compiles']} ({last['compile_seconds']:.1f}){new} |")
    for side, calls in records.items():
        last = calls[-1]
        if "compiles_by" in last:
            arena = f"; prefix cache arena {last['prefix_cache_mib']:.0f} MiB" if last.get("prefix_cache_mib") else ""
            print(f"# {side}: programs {last['compiles_by']}; compile s by function {last['compile_seconds_by']}{arena}")


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
        own = script_arguments(add_arguments)
        stats = tempfile.NamedTemporaryFile(prefix="bench_rollouts-", suffix=".jsonl", delete=False).name
        os.environ[STATS] = stats  # inherited by the workers
        os.environ[BEFORE_TREE] = export_tree(own.before_ref)
        if not own.checkpoint:
            os.environ[TOKENIZER_DIR] = save_subvocabulary_tokenizer(workload(own))
    main_side_by_side(
        "SimWeb agent rollouts (ReActAgent.run_batch, step-wise BM25 injection, replaying the scripted agent): "
        "before/after = LocalEngine of --before-ref / of this tree on an organism-sized random Qwen3, "
        "scripted = the scripted agent alone (no model)",
        {"before": before, "after": after, "scripted": scripted},
        add_arguments,
        lambda a: (workload(a).tasks * workload(a).n, "rollouts"),
        reference="before",
    )
    if not worker:
        args = workload(script_arguments(add_arguments))
        report(stats)
        os.remove(stats)
        report_generation_rate(args)
