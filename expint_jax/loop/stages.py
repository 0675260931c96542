"""The stages of one iteration k of the loop (π_k → E_k → data → π_{k+1} → evaluation).

Each stage is a function ``(run, k, work) -> summary`` that writes its outputs into ``work`` (the
stage's partial folder, see ``layout``) and returns a JSON-ready summary; the driver publishes the
folder. Each stage also has a *key*: the configuration it depends on plus the keys of the stages
it reads, so a changed setting is caught at the first stage it affects.

  rollouts   π_k acts ``extract.samples`` times on each extraction task (optionally with the pool
             built so far injected globally, batch by batch): ``rollouts_<b>.jsonl``. Under
             ``extract.schedule="release_steps"`` nothing: the extract stage rolls out per step.
  extract    E_k from those rollouts by the configured writer (offline | llm | self), starting
             from an empty pool or E_{k-1} (``extract.warm_start``): ``pool.jsonl``, ``pool.json``,
             ``granularity.json``, ``diff.json``. Under ``release_steps`` E_k is built over the
             release's steps (``experience.extract.steps``): each step π_k rolls out on a batch of
             queries with the pool so far in the prompt, judged by the training world, and the
             writer updates the pool; the folder also holds the release's ``epoch_<e>/``,
             ``step_<k>/`` and ``stats.json``, and a killed stage resumes at its first unfinished step.
  base_eval  (k = 0 only) π_0 evaluated in every mode with E_0: ``eval.json`` + rollouts.
  data       the regime's data: off_policy / sft: the teacher (π_k with E_k) rolls out on the
             distillation tasks and only judged-correct rollouts are kept (``accepted.jsonl``,
             ``acceptance.json``), their citations of E_k scrubbed (``distill.scrub_experience_refs``); on_policy: none up front (the student samples during training).
             Every regime: one teacher rollout per held-out task (``heldout.jsonl``), the fixed
             set the held-out KL is measured on before and after training.
  train      student = π_k, teacher = frozen π_k: the trainer on the regime's data (on_policy:
             rounds of fresh student samples, ``round_<r>/`` with the student that finished each
             round in ``round_<r>/student/``), then π_{k+1} exported as a Hugging Face directory
             (``policy/``).
  eval       π_{k+1} without experience and with E_k (global, stepwise): ``eval.json`` + rollouts.

``on_empty``: when extraction finds no informative group (or the pool is empty) or no teacher
rollout is accepted, the stage says so in its summary and ``keep_policy`` makes π_{k+1} = π_k
(``policy/`` is π_k re-exported), while ``stop`` ends the loop after this stage.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from expint_jax import storage
from expint_jax.config import ConfigError, to_dict
from expint_jax.distill.pipeline import ExampleSet, build_examples
from expint_jax.distill.trainer import train
from expint_jax.experience.bank import ExperiencePool, diff_pools, read_pool, write_pool_files
from expint_jax.experience.extract.groups import group_rollouts
from expint_jax.experience.extract.steps import (StepPlan, problem_with_experience, read_step_rollouts,
                                                 run_extraction_steps)
from expint_jax.experience.inject import InjectionSpec, annotate_injections, make_injection
from expint_jax.experience.select import make_selector
from expint_jax.loop import acting, hosts
from expint_jax.loop.config import LoopConfig
from expint_jax.loop.metrics import evaluate
from expint_jax.loop.regimes import acceptance, make_regime, round_steps
from expint_jax.models.hf import save_checkpoint
from expint_jax.models.source import build_model, load_model
from expint_jax.parallel import coordination
from expint_jax.records import Message, SamplingParams, Trajectory, read_trajectories
from expint_jax.rollout.agent import ReActAgent
from expint_jax.rollout.envs.base import Environment, Task
from expint_jax.token_signal import read_signals, signal_path, write_signals

log = logging.getLogger(__name__)

STAGES = ("rollouts", "extract", "base_eval", "data", "train", "eval")


class EmptyStage(Exception):
    """Raised by a stage with nothing to work with under ``on_empty="stop"``; carries the reason."""


@dataclasses.dataclass
class Run:
    """What every stage of a run shares: the configuration, its folder and the loaded tools."""

    config: LoopConfig
    run_dir: Path
    tokenizer: Any
    chat: Any
    mesh: Any
    worlds: acting.Worlds
    stage_hashes: dict[str, str] = dataclasses.field(default_factory=dict)  # "iter_000/extract" -> hash
    _actors: acting.Actors | None = dataclasses.field(default=None, repr=False)

    def stage_dir(self, k: int, name: str) -> Path:
        return self.run_dir / f"iter_{k:03d}" / name

    def upstream(self, k: int, name: str) -> str:
        return self.stage_hashes.get(f"iter_{k:03d}/{name}", "")

    # ----------------------------------------------------------------- policies and pools

    def policy_dir(self, k: int) -> Path | None:
        """Where π_k lives (None: π_0, the configured base model)."""
        return None if k == 0 else self.stage_dir(k - 1, "train") / "policy"

    def policy_key(self, k: int) -> str:
        return "base" if k == 0 else self.upstream(k - 1, "train")

    def load_policy(self, k: int, *, remat: str = "none"):
        directory = self.policy_dir(k)
        if directory is None:
            return build_model(self.config.model, self.mesh, remat=remat)
        return load_model(directory, self.config.model, self.mesh, remat=remat)

    @property
    def actors(self) -> acting.Actors:
        if self._actors is None:
            self._actors = acting.Actors(self.config, self.tokenizer, self.mesh, self.run_dir,
                                         count_tokens=lambda messages: len(self.chat.encode_prompt(messages)))
        return self._actors

    def acting_backend(self, k: int, log_dir: Path):
        """The backend acting for π_k in the current stage; a policy server's log goes to ``log_dir``."""
        return self.actors.backend(self.policy_dir(k), lambda: self.load_policy(k), log_dir)

    def stop_serving(self) -> None:
        """Stops the stage's policy server, if one runs (the driver calls this when a stage ends)."""
        if self._actors is not None:
            self._actors.close()

    def pool(self, k: int) -> ExperiencePool:
        return read_pool(self.stage_dir(k, "extract") / "pool.jsonl")

    def injection(self, pool: ExperiencePool, mode: str) -> InjectionSpec:
        inj = self.config.injection
        selector = None
        if mode == "stepwise":
            backend = _endpoint(self.config) if inj.selector == "llm" else None
            selector = make_selector(inj.selector, backend=backend, k=inj.k)
        return make_injection(mode, pool.as_mapping(), selector, stepwise_system_note=inj.stepwise_system_note)

    def seed(self, k: int, stage: str) -> int:
        """The rollout seed of a stage. Every evaluation (π_0's included) uses the same seed, so the
        policies are compared on common random numbers; the other stages draw fresh ones per iteration."""
        if stage in ("base_eval", "eval"):
            return self.config.seed * 1_000_003 + STAGES.index("eval") * 101
        return self.config.seed * 1_000_003 + 1009 * k + STAGES.index(stage) * 101

    def count_tokens(self, text: str) -> int:
        return len(self.chat.text_ids(text)) if text else 0


class EndpointError(RuntimeError):
    """The writer's (or selector's) endpoint failed for good; the stage fails rather than writing
    a pool out of the extraction pipeline's fallbacks."""


class _FailFast:
    """A ``ChatBackend`` wrapper raising ``EndpointError`` (naming the endpoint, never the key)
    when a request still fails after the backend's own retries."""

    def __init__(self, backend, where: str):
        self.backend, self.where = backend, where

    def chat(self, conversations, params):
        completions = self.backend.chat(conversations, params)
        failed = [c for c in completions if c.finish_reason == "error"]
        if failed:
            raise EndpointError(f"endpoint {self.where}: {len(failed)} of {len(completions)} requests failed after "
                                f"retries; first error: {failed[0].error}")
        return completions


def _endpoint(config: LoopConfig):
    from expint_jax.llm.http import RetryPolicy
    from expint_jax.llm.openai import OpenAICompatible

    e = config.extract.endpoint
    backend = OpenAICompatible(e.base_url, e.model, api_key_env=e.api_key_env or None,
                               max_concurrency=e.max_concurrency,
                               retry=RetryPolicy(max_attempts=e.max_attempts, timeout_s=e.timeout_s))
    return _FailFast(backend, f"{e.base_url} (model {e.model})")


def _section(config: LoopConfig, *names: str) -> dict[str, Any]:
    full = to_dict(config)
    return {name: full[name] for name in names}


# ---------------------------------------------------------------------- keys


def stage_key(run: Run, k: int, name: str) -> dict[str, Any]:
    """The configuration values and upstream stage hashes stage ``name`` of iteration ``k`` depends on."""
    c = run.config
    # extract.batch_tasks partitions every stage's rollout files: a resumed stage must keep it.
    # The env is named by its own section (simweb | webwalker | math): a SimWeb key is as before.
    acting_keys = {**_section(c, "model", c.env, "agent", "seed"), "policy": acting.policy_key(c.policy),
                   "batch_tasks": c.extract.batch_tasks}
    if c.env == "simweb" and c.simweb.url_style == "path":  # the default: a key made before the option holds
        del acting_keys["simweb"]["url_style"]
    release_steps = c.extract.schedule == "release_steps"
    if name == "rollouts" and release_steps:  # records nothing (the extract stage rolls out per step)
        return {"extract": {"schedule": c.extract.schedule}}
    if name == "rollouts":
        extract = to_dict(c.extract)
        used = {key: extract[key] for key in ("tasks", "samples", "batch_tasks", "inject_running_pool")}
        if c.extract.inject_running_pool:
            used.update({key: extract[key] for key in ("granularity", "writer", "endpoint", "max_pool_size",
                                                       "warm_start", "temperature", "max_tokens")})
        return {**acting_keys, "extract": used, "policy_of": run.policy_key(k),
                "previous_pool": run.upstream(k - 1, "extract") if c.extract.warm_start and k else ""}
    if name == "extract":
        extract = to_dict(c.extract)
        if not release_steps:  # the schedule's settings do not apply (and a key made before they existed holds)
            del extract["schedule"], extract["steps"]
        acts = {**acting_keys, "policy_of": run.policy_key(k)} if release_steps else {}
        return {**acts, "extract": extract, "rollouts": run.upstream(k, "rollouts"),
                "previous_pool": run.upstream(k - 1, "extract") if c.extract.warm_start and k else ""}
    if name in ("base_eval", "eval"):
        policy = run.policy_key(0) if name == "base_eval" else run.upstream(k, "train")
        return {**acting_keys, **_section(c, "eval", "injection"), "policy_of": policy,
                "pool": run.upstream(k, "extract")}
    if name == "data":
        return {**acting_keys, **_section(c, "distill", "injection"), "policy_of": run.policy_key(k),
                "pool": run.upstream(k, "extract")}
    if name == "train":
        return {**_section(c, "model", "mesh", "trainer", "budget", "distill", "injection", "on_empty"),
                "policy_of": run.policy_key(k), "data": run.upstream(k, "data"),
                "pool": run.upstream(k, "extract")}
    raise ValueError(f"unknown stage {name!r}")


# ---------------------------------------------------------------------- writers


def write_experience(run: Run, k: int, trajectories: list[Trajectory], start: ExperiencePool,
                     workdir: Path, *, self_backend=None) -> tuple[ExperiencePool, dict[str, Any]]:
    """E from scored rollouts by the configured writer; ``(pool, facts)``. Writer ``self`` writes
    through ``self_backend`` when given (π_k's acting backend), else through π_k loaded anew."""
    c = run.config.extract
    groups = group_rollouts(trajectories)
    informative = [g for g in groups if g.is_informative]
    facts: dict[str, Any] = {"groups": len(groups), "informative_groups": len(informative)}
    if not informative:
        return start, facts
    if c.writer == "offline":
        from expint_jax.rollout.envs.simweb.writer import OfflineWriterConfig, write_offline

        pool = write_offline(groups, start, OfflineWriterConfig(granularity=c.granularity,
                                                                max_pool_size=c.max_pool_size), iteration=k)
        return pool, facts
    from expint_jax.experience.extract.config import ExtractionConfig
    from expint_jax.experience.extract.pipeline import STAGES as EXTRACTION_STAGES
    from expint_jax.experience.extract.pipeline import extract_experience

    if c.writer == "llm":
        backend = _endpoint(run.config)
    else:  # "self": π_k writes its own experience through the local engine
        backend = self_backend or run.acting_backend(k, workdir)
    settings = ExtractionConfig(granularity=c.granularity, max_pool_size=c.max_pool_size,
                                sampling=SamplingParams(temperature=c.temperature, max_tokens=c.max_tokens))
    with tqdm(total=len(EXTRACTION_STAGES), desc=f"extract ({c.writer})", unit="stage", leave=False,
              disable=not run.config.progress_bar) as bar:
        pool = extract_experience(groups, start, backend, settings, workdir, iteration=k,
                                  on_stage_done=lambda stage: (bar.set_postfix(done=stage), bar.update()))
    return pool, facts


def _start_pool(run: Run, k: int) -> ExperiencePool:
    return run.pool(k - 1) if run.config.extract.warm_start and k > 0 else ExperiencePool()


# ---------------------------------------------------------------------- stages


def rollouts_stage(run: Run, k: int, work: Path) -> dict[str, Any]:
    c = run.config
    if c.extract.schedule == "release_steps":
        return {"rollouts": 0, "skipped": "extract.schedule='release_steps': the extract stage rolls out per step"}
    tasks = acting.pick(run.worlds.train.tasks(), c.extract.tasks)
    backend = run.acting_backend(k, work)
    injection: InjectionSpec | Callable[[int], InjectionSpec] = make_injection("none")
    running: dict[int, ExperiencePool] = {}
    after_batch = None
    if c.extract.inject_running_pool:
        injection, after_batch = _running_pool(run, k, work, running)
    found = acting.rollouts(backend, acting.agent_config(c), run.worlds.train, tasks, samples=c.extract.samples,
                            seed=run.seed(k, "rollouts"), directory=work, prefix="rollouts",
                            batch_tasks=c.extract.batch_tasks, injection=injection, after_batch=after_batch,
                            progress=c.progress_bar)
    if running:
        write_pool_files(work / "running_final", running[max(running)])
    correct = sum((t.reward or 0.0) >= 0.5 for t in found)
    return {"tasks": len(tasks), "rollouts": len(found), "accuracy": correct / max(len(found), 1)}


def _running_pool(run: Run, k: int, work: Path, running: dict[int, ExperiencePool]):
    """Batch b of the extraction rollouts sees, injected globally, the pool written from batches < b
    (as the release does); each batch's pool is stored so a resumed stage rebuilds the same ones."""
    running[0] = _start_pool(run, k)

    def injection(b: int) -> InjectionSpec:
        pool = running[b]
        return make_injection("global", pool.as_mapping()) if len(pool) else make_injection("none")

    def after_batch(b: int, done: list[Trajectory]) -> None:
        folder = work / f"running_{b:04d}"
        if (folder / "pool.jsonl").exists():
            running[b + 1] = read_pool(folder / "pool.jsonl")
            return
        pool, _ = write_experience(run, k, done, running[b], work / f"writer_{b:04d}")
        write_pool_files(folder, pool)
        running[b + 1] = pool

    return injection, after_batch


def extract_stage(run: Run, k: int, work: Path) -> dict[str, Any]:
    c = run.config.extract
    trajectories = acting.read_rollouts(run.stage_dir(k, "rollouts"), "rollouts")
    start = _start_pool(run, k)
    running = run.stage_dir(k, "rollouts") / "running_final" / "pool.jsonl"
    if c.schedule == "release_steps":
        pool, facts = _extract_in_steps(run, k, work)
    elif c.inject_running_pool and running.exists():
        groups = group_rollouts(trajectories)
        pool, facts = read_pool(running), {"groups": len(groups),
                                           "informative_groups": sum(g.is_informative for g in groups),
                                           "from": "the running pool of the rollouts stage"}
    else:
        pool, facts = write_experience(run, k, trajectories, start, work / "pipeline")
    write_pool_files(work, pool)
    previous = run.pool(k - 1) if k > 0 else ExperiencePool()
    diff = diff_pools(previous, pool)
    storage.write_json(work / "diff.json", diff.to_json())
    from expint_jax.experience.granularity import analyze_pool

    summary = {**facts, "pool_size": len(pool), "writer": c.writer, "granularity": c.granularity,
               "diff_vs_previous": diff.summary(), "granularity_report": analyze_pool(pool).to_json()}
    if not facts["informative_groups"] or not len(pool):
        summary["empty"] = ("no informative rollout group (every group all right or all wrong)"
                            if not facts["informative_groups"] else "the pool is empty")
    return summary


def extraction_plan(run: Run, k: int) -> StepPlan:
    """The release schedule's plan of iteration ``k`` (``ConfigError`` when the extraction tasks cannot
    fill an epoch's batches)."""
    c = run.config.extract
    available = len(acting.pick(run.worlds.train.tasks(), c.tasks))
    per_epoch = c.steps.batches_per_epoch * c.steps.queries_per_batch
    if per_epoch > available or available < c.steps.queries_per_batch:
        raise ConfigError(f"config.extract.steps: batches_per_epoch={c.steps.batches_per_epoch} x queries_per_batch="
                          f"{c.steps.queries_per_batch} need {max(per_epoch, c.steps.queries_per_batch)} extraction "
                          f"tasks per epoch; the training world gives {available} (extract.tasks={c.tasks})")
    return StepPlan(epochs=c.steps.epochs, batch_size=c.steps.queries_per_batch, rollouts_per_query=c.samples,
                    queries_per_epoch=per_epoch or None, seed=run.seed(k, "extract"))


@dataclasses.dataclass(frozen=True)
class _AsGiven:
    """The training world for tasks whose question carries the pool: tools and judge see each task
    as given (an LLM judge must not read the pool as part of the question)."""

    env: Environment
    given: Mapping[str, Task]

    def tools(self, task: Task):
        return self.env.tools(self.given[task.task_id])

    def score(self, task: Task, prediction: str | None) -> float:
        return self.env.score(self.given[task.task_id], prediction)


def _step_rollout(run: Run, k: int, backend):
    """One step's rollouts as the release makes them: π_k's ReAct agent on each query written with
    ``problem_with_experience`` (the pool entering the step; the plain question while it is empty).
    The stored trajectory keeps the plain question (the pool it saw is ``step_<s>/experiences.json``;
    ``metadata["experience_in_prompt"]`` counts its items), as every trajectory here stores no experience."""
    c = run.config

    def rollout(tasks: Sequence[Task], pool: ExperiencePool, step: int) -> list[Trajectory]:
        items = pool.as_mapping()
        asked = [dataclasses.replace(t, question=problem_with_experience(t.question, items)) for t in tasks]
        prompts = {t.task_id: (a.question, t.question) for t, a in zip(tasks, asked, strict=True)}
        seed = int(np.random.SeedSequence([run.seed(k, "extract"), step]).generate_state(1)[0])
        found = ReActAgent(backend, acting.agent_config(c)).run_batch(
            asked, _AsGiven(run.worlds.train, {t.task_id: t for t in tasks}), n=c.extract.samples, seed=seed)
        return [_with_question(t, *prompts[t.task_id], len(items)) for t in found]

    return rollout


def _with_question(trajectory: Trajectory, prompt: str, question: str, items: int) -> Trajectory:
    messages = list(trajectory.messages)
    first = next(i for i, m in enumerate(messages) if m.role == "user")
    messages[first] = Message("user", messages[first].content.replace(prompt, question, 1))
    return dataclasses.replace(trajectory, messages=tuple(messages),
                               metadata={**trajectory.metadata, "experience_in_prompt": items})


def _extract_in_steps(run: Run, k: int, work: Path) -> tuple[ExperiencePool, dict[str, Any]]:
    """E_k by the release's schedule (``extract.schedule="release_steps"``), laid out in ``work``."""
    c = run.config
    tasks = acting.pick(run.worlds.train.tasks(), c.extract.tasks)
    plan = extraction_plan(run, k)
    backend = run.acting_backend(k, work)

    def write(trajectories: Sequence[Trajectory], pool: ExperiencePool, workdir: Path) -> ExperiencePool:
        return write_experience(run, k, list(trajectories), pool, workdir,
                                self_backend=backend if c.extract.writer == "self" else None)[0]

    with tqdm(total=plan.steps(len(tasks)), desc="extraction steps", unit="step", leave=False,
              disable=not c.progress_bar) as bar:
        pool = run_extraction_steps(tasks, _step_rollout(run, k, backend), write, plan, work,
                                    start_pool=_start_pool(run, k), on_step_done=lambda step, stats: bar.update())
    steps = read_step_rollouts(work, plan.steps(len(tasks)))
    groups = [g for step in steps for g in group_rollouts(step)]
    rollouts = [t for step in steps for t in step]
    return pool, {"schedule": "release_steps", "steps": len(steps), "rollouts": len(rollouts),
                  "accuracy": sum((t.reward or 0.0) >= 0.5 for t in rollouts) / max(len(rollouts), 1),
                  "groups": len(groups), "informative_groups": sum(g.is_informative for g in groups)}


def _evaluate_policy(run: Run, policy: int, pool: ExperiencePool, k: int, stage: str, work: Path) -> dict[str, Any]:
    c = run.config
    tasks = acting.pick(run.worlds.test.tasks(), c.eval.tasks)
    backend = run.acting_backend(policy, work)  # π_policy
    levels = acting.levels_of(tasks)
    result: dict[str, Any] = {"pool_size": len(pool)}
    for mode in c.eval.modes:
        if mode != "none" and not len(pool):
            result[mode] = {"skipped": "the pool is empty"}
            continue
        found = acting.rollouts(backend, acting.agent_config(c), run.worlds.test, tasks, samples=c.eval.samples,
                                seed=run.seed(k, stage), directory=work, prefix=mode, batch_tasks=c.extract.batch_tasks,
                                injection=run.injection(pool, mode), progress=c.progress_bar)
        result[mode] = evaluate(found, samples=c.eval.samples, levels=levels, count_tokens=run.count_tokens)
    return result


def base_eval_stage(run: Run, k: int, work: Path) -> dict[str, Any]:
    result = {"policy": 0, **_evaluate_policy(run, 0, run.pool(0), 0, "base_eval", work)}
    storage.write_json(work / "eval.json", result)
    return _eval_summary(result)


def eval_stage(run: Run, k: int, work: Path) -> dict[str, Any]:
    train_dir = run.stage_dir(k, "train")
    trained = storage.read_json(train_dir / "done.json")["summary"]
    result = {"policy": k + 1, **_evaluate_policy(run, k + 1, run.pool(k), k, "eval", work),
              "heldout_kl": {"before": trained.get("kl_before"), "after": trained.get("kl_after")},
              "train_status": trained.get("status")}
    storage.write_json(work / "eval.json", result)
    return _eval_summary(result)


def _eval_summary(result: Mapping[str, Any]) -> dict[str, Any]:
    return {mode: result[mode].get("accuracy") for mode in ("none", "global", "stepwise") if mode in result}


def data_stage(run: Run, k: int, work: Path) -> dict[str, Any]:
    c = run.config
    regime = make_regime(c)
    pool = run.pool(k)
    summary: dict[str, Any] = {"regime": regime.name}
    if not len(pool):
        summary["empty"] = "the pool is empty: no teacher context to distill"
        return summary
    teacher_spec = run.injection(pool, c.injection.mode)
    backend = run.acting_backend(k, work)
    agent = acting.agent_config(c)
    # teacher = "from_rollout": the teacher's own top-k + tail at every token it writes is kept.
    signal_k = c.trainer.step.divergence.top_k if c.trainer.step.from_rollout else 0
    heldout_tasks = acting.pick(run.worlds.test.tasks(), c.distill.heldout_tasks)
    heldout = acting.rollouts(backend, agent, run.worlds.test, heldout_tasks, samples=1, seed=run.seed(k, "data") + 1,
                              directory=work, prefix="heldout", batch_tasks=c.extract.batch_tasks,
                              injection=teacher_spec, progress=c.progress_bar,
                              signal_top_k=signal_k) if heldout_tasks else []
    _write_with_signals(work / "heldout.jsonl", heldout,
                        acting.read_batch_signals(work, "heldout") if signal_k and heldout else None)
    summary["heldout"] = len(heldout)
    if regime.teacher_acts:
        tasks = acting.pick(run.worlds.train.tasks(), c.distill.tasks)
        teacher = acting.rollouts(backend, agent, run.worlds.train, tasks, samples=c.distill.samples,
                                  seed=run.seed(k, "data"), directory=work, prefix="teacher",
                                  batch_tasks=c.extract.batch_tasks, injection=teacher_spec, progress=c.progress_bar,
                                  signal_top_k=signal_k)
        signals = acting.read_batch_signals(work, "teacher") if signal_k else [None] * len(teacher)
        kept = acceptance(teacher, c.distill.accept_reward)
        accepted_ids = {id(t) for t in kept.accepted}
        pairs = [(t, s) for t, s in zip(teacher, signals, strict=True) if id(t) in accepted_ids]
        if c.distill.scrub_experience_refs:
            pairs, summary["scrubbed"] = _scrubbed(pairs, pool)
        accepted = [t for t, _ in pairs]
        _write_with_signals(work / "accepted.jsonl", accepted, [s for _, s in pairs] if signal_k else None)
        storage.write_json(work / "acceptance.json", kept.to_json())
        summary.update(teacher_rollouts=len(teacher), accepted=len(accepted), acceptance_rate=kept.rate)
        if not accepted:
            summary["empty"] = f"no teacher rollout was judged correct (0 of {len(teacher)})"
    return summary


def _write_with_signals(path: Path, trajectories: list[Trajectory], signals: list | None) -> None:
    """Trajectories and, when recorded, their teacher signals (the sidecar first, see ``acting``)."""
    if signals is not None:
        write_signals(signal_path(path), signals)
    storage.write_jsonl(path, (t.to_json() for t in trajectories))


def _scrubbed(pairs: list[tuple[Trajectory, Any]], pool: ExperiencePool) -> tuple[list[tuple[Trajectory, Any]], dict]:
    """The student never sees E_k: a teacher turn citing it ("as G3 says") would teach citing
    nothing, so citations are cut (a rewritten turn no longer matches its recorded signal and is
    then left out of ``from_rollout`` training by the views' alignment check) or the rollout dropped."""
    from expint_jax.experience.scrub import scrub_experience_refs

    kept, totals = [], {"trajectories": 0, "rewritten_turns": 0, "removed_sentences": 0, "dropped": 0}
    for trajectory, signal in pairs:  # one at a time, so each kept rollout stays beside its signal
        scrubbed, report = scrub_experience_refs([trajectory], pool.as_mapping())
        kept.extend((t, signal) for t in scrubbed)
        for name in totals:
            totals[name] += report.to_json()[name]
    return kept, totals


def _examples(run: Run, trajectories: list[Trajectory], where: str) -> ExampleSet:
    """Views of trajectories stored at ``where``, with their teacher signals when the step reads them."""
    signals = read_signals(signal_path(where)) if run.config.trainer.step.from_rollout else None
    return build_examples([(f"{where}:{i + 1}", t) for i, t in enumerate(trajectories)], run.chat, run.config.budget,
                          signals=signals)


def keep_policy(run: Run, k: int, work: Path, reason: str) -> dict[str, Any]:
    """π_{k+1} = π_k: re-exported as this iteration's policy."""
    log.warning("iteration %d: %s; on_empty=keep_policy: the policy stays π_%d", k, reason, k)
    save_checkpoint(run.load_policy(k), work / "policy", tokenizer=run.tokenizer)
    return {"status": "kept_policy", "reason": reason, "steps": 0}


def train_stage(run: Run, k: int, work: Path) -> dict[str, Any]:
    c = run.config
    regime = make_regime(c)
    data_dir = run.stage_dir(k, "data")
    facts = storage.read_json(data_dir / "done.json")["summary"]
    if facts.get("empty"):
        return _on_empty(run, k, work, facts["empty"])
    heldout = read_trajectories(data_dir / "heldout.jsonl")
    eval_data = _examples(run, heldout, str(data_dir / "heldout.jsonl")) if heldout else None
    if eval_data is not None and not eval_data.examples:
        eval_data = None
    trainer = dataclasses.replace(c.trainer, step=regime.step(c.trainer.step), eval_at_start=True,
                                  progress_bar=c.progress_bar and c.trainer.progress_bar)
    if regime.teacher_acts:
        accepted = read_trajectories(data_dir / "accepted.jsonl")
        train_data = _examples(run, accepted, str(data_dir / "accepted.jsonl"))
        if not train_data.examples:
            return _on_empty(run, k, work, "no accepted trajectory gives a training example (counts: "
                                           f"{train_data.counts.to_json()}; see config.budget, and for "
                                           "teacher='from_rollout' the signal alignment count skipped_no_signal)")
    student = run.load_policy(k, remat=c.model.remat)
    teacher = run.load_policy(k) if trainer.step.needs_teacher else None
    if regime.teacher_acts:
        steps = train(trainer, student, teacher, train_data, eval_data, output_dir=work / "trainer",
                      mesh=run.mesh).steps
        first = last = work / "trainer"
    else:
        first, last, steps = _on_policy_rounds(run, k, work, trainer, student, teacher, eval_data)
    save_checkpoint(student, work / "policy", tokenizer=run.tokenizer)
    return {"status": "trained", "regime": regime.name, "loss": trainer.step.divergence.kind, "steps": steps,
            **_logged_figures(first, last)}


def _logged_figures(first: Path, last: Path) -> dict[str, float | None]:
    """Held-out KL before (the first trainer run's step-0 evaluation) and after (the last run's last
    evaluation), and the last training loss, read from the trainers' metric files: a run resumed
    after a kill returns no in-memory metrics for the steps it did not redo."""
    from expint_jax.distill.metrics_log import read_metrics

    def rows(directory: Path, split: str) -> list[dict[str, Any]]:
        path = directory / "metrics" / f"{split}.jsonl"
        return read_metrics(path) if path.exists() else []

    start = [r for r in rows(first, "eval") if r["step"] == 0]
    evals, trained = rows(last, "eval"), rows(last, "train")
    end = evals[-1] if evals and evals[-1]["step"] > 0 else {}
    # Under teacher="from_rollout" only the top-k + tail loss is known (a lower bound of the KL).
    return {"kl_before": start[0].get("kl") if start else None, "kl_after": end.get("kl"),
            "heldout_loss_before": start[0].get("loss") if start else None, "heldout_loss_after": end.get("loss"),
            "loss_after": trained[-1].get("loss") if trained else None}


def _on_empty(run: Run, k: int, work: Path, reason: str) -> dict[str, Any]:
    if run.config.on_empty == "stop":
        raise EmptyStage(reason)
    return keep_policy(run, k, work, reason)


def _on_policy_rounds(run: Run, k: int, work: Path, trainer, student, teacher,
                      eval_data: ExampleSet | None) -> tuple[Path, Path, int]:
    """Rounds of (sample with the current student, no experience) -> (attach the teacher's contexts
    to those very prefixes) -> (train ``refresh_every`` steps). Each round is its own trainer run
    (``round_<r>/``; resumable), so the optimizer state and learning-rate schedule restart each
    round; the student's weights carry over."""
    c = run.config
    regime = make_regime(c)
    tasks = acting.pick(run.worlds.train.tasks(), c.distill.tasks)
    spec = run.injection(run.pool(k), c.injection.mode)
    plan: list[int] | None = None
    steps_done = r = 0
    processes = coordination.current()
    while plan is None or r < len(plan):
        round_dir = work / f"round_{r:03d}"
        annotated = _student_samples(run, k, r, student, work, tasks, spec, processes)
        data = _examples(run, annotated, str(round_dir / "annotated.jsonl"))
        if not data.examples:
            raise RuntimeError(f"{round_dir}: none of the student's {len(annotated)} samples gives a training example "
                               f"(counts: {data.counts.to_json()}); check the length budget (config.budget)")
        batches = math.ceil(len(data.examples) / trainer.batching.rows)
        if plan is None:
            total = trainer.epochs * batches if trainer.max_steps is None else min(trainer.max_steps,
                                                                                 trainer.epochs * batches)
            plan = round_steps(total, regime.refresh_every or 0, batches)
            if processes.is_leader:
                storage.write_json(work / "rounds.json", {"steps_per_round": plan})
        steps = plan[r]
        round_config = dataclasses.replace(trainer, epochs=math.ceil(steps / batches), max_steps=steps)
        steps_done += train(round_config, student, teacher, data, eval_data, output_dir=round_dir / "trainer",
                            mesh=run.mesh).steps
        if not (round_dir / "student" / "config.json").exists():  # the weights that sample the next round
            save_checkpoint(student, round_dir / "student", tokenizer=run.tokenizer)
        r += 1  # train() left the trained weights in ``student``: they act in the next round
    return work / "round_000" / "trainer", work / f"round_{r - 1:03d}" / "trainer", steps_done


def _student_samples(run: Run, k: int, r: int, student, work: Path, tasks, spec: InjectionSpec,
                     processes: coordination.Processes) -> list[Trajectory]:
    """Round ``r``'s samples of the student (no experience) with the teacher's contexts attached,
    also written to ``round_<r>/annotated.jsonl``. The student that samples: π_k, then the one the
    previous round exported (a server serves that folder). Several processes: process 0 samples
    with its own copy of it (``hosts``), the others read the file."""
    c = run.config
    path = work / f"round_{r:03d}" / "annotated.jsonl"
    sampler = work / f"round_{r - 1:03d}" / "student" if r else run.policy_dir(k)
    annotated: list[Trajectory] = []

    def sample() -> None:
        acting_run = hosts.acting_run(run, processes)
        load = (lambda: student) if acting_run is run else (
            lambda: acting_run.load_policy(k) if r == 0 else load_model(sampler, c.model, acting_run.mesh))
        try:
            backend = acting_run.actors.backend(sampler, load, path.parent)
            samples = acting.rollouts(backend, acting.agent_config(c), run.worlds.train, tasks,
                                      samples=c.distill.samples, seed=run.seed(k, "train") + r, directory=path.parent,
                                      prefix="student", batch_tasks=c.extract.batch_tasks, progress=c.progress_bar)
        finally:
            acting_run.stop_serving()  # the trainer gets the accelerators back
        annotated.extend(annotate_injections(samples, spec))
        storage.write_jsonl(path, (t.to_json() for t in annotated))

    what = f"{path.parent.relative_to(run.run_dir)} (student samples)"
    processes.leader_runs(what, sample)
    if processes.is_leader:
        return annotated
    hosts.await_visible(path, processes, what=what)
    return read_trajectories(path)


STAGE_FUNCTIONS: dict[str, Callable[[Run, int, Path], dict[str, Any]]] = {
    "rollouts": rollouts_stage, "extract": extract_stage, "base_eval": base_eval_stage, "data": data_stage,
    "train": train_stage, "eval": eval_stage,
}

