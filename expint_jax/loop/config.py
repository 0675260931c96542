"""The schema of ``expint run``: one typed section per concern, validated before any work starts.

Every section is a frozen dataclass whose defaults are the single source of defaults; config files
(``configs/*.py``) set only what differs. ``check_config`` adds the checks a schema cannot state
(files that must exist, environment variables a writer endpoint needs, combinations of choices)
and raises ``ConfigError`` with one line naming the key.

Task split (SimWeb): the training world (``split="train"``) gives the extraction tasks (the first
``extract.tasks``) and the distillation tasks (the first ``distill.tasks``; the paper uses the
same tasks for both); the held-out world (``split="test"``) gives the evaluation tasks and the
fixed held-out teacher trajectories the KL is measured on (the first ``distill.heldout_tasks``).
``env`` chooses the environment; WebWalkerQA and math split the same way (``WebWalkerSection``,
``MathSection`` say where each world's tasks come from).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import random
import shlex
import shutil
from pathlib import Path
from typing import Literal

from expint_jax.config import ConfigError
from expint_jax.distill.trainer import TrainerConfig
from expint_jax.distill.views import ViewBudget
from expint_jax.llm.server import ServerSpec, check_command
from expint_jax.models.source import ModelSpec
from expint_jax.parallel.mesh import MeshConfig
from expint_jax.records import RecordError
from expint_jax.rollout.envs.base import Task
from expint_jax.rollout.envs.math import FAMILIES as MATH_FAMILIES, LEVELS as MATH_LEVELS
from expint_jax.rollout.envs.simweb.tasks import UrlStyle
from expint_jax.rollout.envs.webwalker import load_webqa_tasks

MODES = ("none", "global", "stepwise")


@dataclasses.dataclass(frozen=True)
class PolicySection:
    """Who acts. ``local``: π_k itself through the local JAX engine. ``reference``: SimWeb's scripted
    agent (``ReferencePolicy``) stands in for the model in every rollout, so that every stage sees
    real data on a CPU; the weights are still trained and exported, but they do not act.
    ``server``: π_k's Hugging Face directory served by an inference engine (vLLM, SGLang, or
    ``python -m expint_jax.llm.serve``) started from ``server.command`` for each stage in which π_k
    acts and stopped after it (``llm.server``). The block sits here rather than in a rollout
    section because it replaces the local engine wherever the policy acts: the extraction
    rollouts, the teacher's rollouts, the evaluations, the on-policy student's samples and the
    ``self`` writer."""

    backend: Literal["local", "reference", "server"] = "local"
    server: ServerSpec = ServerSpec()  # backend "server"
    max_batch_size: int = 8  # local engine: rows decoded together
    max_context: int = 4096  # local engine: prompt + generation tokens per row
    reference_mistake_rate: float = 0.3  # reference backend: chance of each scripted mistake
    reference_sensitive: bool = True  # reference backend: lessons in context change its mistake rates


@dataclasses.dataclass(frozen=True)
class SimWebSection:
    seed: int = 0
    levels: tuple[str, ...] = ("easy", "medium")
    train_tasks_per_level: int = 8  # training world: extraction and distillation tasks
    eval_tasks_per_level: int = 4  # held-out world: evaluation and held-out KL tasks
    url_style: UrlStyle = "path"  # "short" for the model organism (SimWebConfig.url_style)


@dataclasses.dataclass(frozen=True)
class AgentSection:
    """The ReAct agent's limits and sampling; the sampling defaults are the public release's."""

    max_llm_calls: int = 10
    max_context_tokens: int = 8192
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 512
    presence_penalty: float = 1.1


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible server (e.g. DeepSeek, vLLM); the key is read from ``api_key_env``."""

    base_url: str = ""
    model: str = ""
    api_key_env: str = ""
    max_concurrency: int = 8
    max_attempts: int = 4  # per request, with exponential back-off; then the stage fails
    timeout_s: float = 120.0


@dataclasses.dataclass(frozen=True)
class ExtractStepsSection:
    """The release's extraction schedule (``extract.schedule="release_steps"``): each epoch draws a
    fresh sample of ``batches_per_epoch`` x ``queries_per_batch`` extraction tasks; each batch is one
    step: π_k rolls out ``extract.samples`` times per query with the pool so far in its prompt, then
    the writer updates the pool. The defaults are the release's: 3 epochs x 25 batches of 4 queries."""

    epochs: int = 3
    batches_per_epoch: int = 25  # 0: as many whole batches as the extraction tasks fill
    queries_per_batch: int = 4

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.queries_per_batch < 1 or self.batches_per_epoch < 0:
            raise ValueError(f"extract.steps: epochs and queries_per_batch must be >= 1 and batches_per_epoch >= 0, "
                             f"got {self.epochs}, {self.queries_per_batch}, {self.batches_per_epoch}")


@dataclasses.dataclass(frozen=True)
class ExtractSection:
    """``schedule``: ``single`` writes E_k once from all of the ``rollouts`` stage's rollouts;
    ``release_steps`` builds it over the release's many small steps (``ExtractStepsSection``),
    the extract stage rolling out each step itself (the ``rollouts`` stage then records nothing)."""

    tasks: int = 0  # extraction tasks (the first N of the training world); 0 = all
    samples: int = 4  # rollouts of π_k per extraction task (release_steps: per query of a step)
    granularity: Literal["principle", "instance"] = "principle"
    writer: Literal["offline", "llm", "self"] = "offline"
    endpoint: Endpoint = Endpoint()  # writer "llm" (and selector "llm")
    max_pool_size: int = 50
    warm_start: bool = False  # E_k starts from E_{k-1} (False: from an empty pool)
    inject_running_pool: bool = False  # the pool built so far is injected globally into later batches
    batch_tasks: int = 8  # tasks per rollout batch: the unit of resume (and of the running pool)
    temperature: float = 0.0  # writer sampling (self / llm)
    max_tokens: int = 8192
    schedule: Literal["single", "release_steps"] = "single"
    steps: ExtractStepsSection = ExtractStepsSection()  # schedule "release_steps"


@dataclasses.dataclass(frozen=True)
class InjectionSection:
    """How the teacher (and the in-context evaluation) sees E_k."""

    mode: Literal["global", "stepwise"] = "stepwise"
    selector: Literal["bm25", "all", "embedding", "llm"] = "bm25"
    k: int = 4
    stepwise_system_note: bool = True


@dataclasses.dataclass(frozen=True)
class OnPolicySection:
    loss: Literal["reverse_kl", "sampled"] = "reverse_kl"
    refresh_every: int = 0  # optimizer steps between fresh student samples; 0 = every epoch


@dataclasses.dataclass(frozen=True)
class DistillSection:
    regime: Literal["off_policy", "on_policy", "sft"] = "off_policy"
    tasks: int = 0  # distillation tasks (the first N of the training world); 0 = all
    samples: int = 4  # rollouts per distillation task (teacher's, or the student's on-policy)
    accept_reward: float = 1.0  # off_policy / sft keep teacher trajectories with reward >= this
    heldout_tasks: int = 4  # held-out teacher trajectories (one per task) for KL before/after
    scrub_experience_refs: bool = True  # cut the teacher's citations of E_k ("as G3 says") before training
    on_policy: OnPolicySection = OnPolicySection()


@dataclasses.dataclass(frozen=True)
class EvalSection:
    modes: tuple[str, ...] = MODES
    samples: int = 3  # rollouts per evaluation task (Avg. Pass@n over them)
    tasks: int = 0  # evaluation tasks (the first N of the held-out world); 0 = all


@dataclasses.dataclass(frozen=True)
class WebWalkerSection:
    """WebWalkerQA-format JSONL tasks (``rollout/envs/webwalker.py``) answered on the live web: Serper
    search, Jina visit (each page summarized toward the agent's goal by ``summarizer`` when it has a
    base_url, else shown raw up to ``max_page_chars``), scored by a judge (``exact``: normalized
    containment match; ``llm``: the paper's Correct/Incorrect grading by ``judge_endpoint``).

    The training world is ``train_file``; the held-out world ``eval_file`` or, when that is empty, a
    seeded ``eval_fraction`` of ``train_file``'s tasks, chosen by task id so the file's order does not
    matter. A task's ``level`` is its ``info.difficulty_level``. Keys are read from the named
    environment variables; only the names are ever shown."""

    train_file: str = ""
    eval_file: str = ""  # "": split train_file by eval_fraction
    eval_fraction: float = 0.2
    split_seed: int = 0
    include_root_url: bool = False  # tell the agent the website to start from (the original WebWalkerQA)
    search_api_key_env: str = "SERPER_API_KEY"
    search_base_url: str = "https://google.serper.dev"
    search_top_k: int = 10
    visit_api_key_env: str = "JINA_API_KEY"
    visit_base_url: str = "https://r.jina.ai"
    max_page_chars: int = 60_000
    summarizer: Endpoint = Endpoint()  # "" base_url: no summary, the page itself
    judge: Literal["exact", "llm"] = "exact"
    judge_endpoint: Endpoint = Endpoint()  # judge "llm"
    # judge "llm": the release grades rollouts for extraction and distillation with its teacher-style
    # web judge and evaluates with the equivalence judge (rollout.judge.JUDGE_FAMILIES).
    train_judge: Literal["teacher", "equivalence", "browsecomp", "ours"] = "teacher"
    eval_judge: Literal["teacher", "equivalence", "browsecomp", "ours"] = "equivalence"
    judge_parsing: Literal["release", "lenient"] = "release"  # lenient: for judges that think first

    def __post_init__(self) -> None:
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"webwalker.eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.search_top_k < 1 or self.max_page_chars < 1:
            raise ValueError("webwalker.search_top_k and webwalker.max_page_chars must be >= 1")


@dataclasses.dataclass(frozen=True)
class MathSection:
    """Seeded math word problems with the sandboxed ``python`` tool (``rollout/envs/math.py``); the
    training and held-out worlds are two splits of one seed (the split name seeds every problem)."""

    seed: int = 0
    train_split: str = "train"
    test_split: str = "test"
    levels: tuple[str, ...] = MATH_LEVELS
    families: tuple[str, ...] = tuple(MATH_FAMILIES)
    train_tasks_per_level: int = 8  # training world: extraction and distillation tasks
    eval_tasks_per_level: int = 4  # held-out world: evaluation and held-out KL tasks

    def __post_init__(self) -> None:
        if self.train_split == self.test_split:
            raise ValueError(f"math.train_split and math.test_split must differ, both are {self.train_split!r}")
        if self.train_tasks_per_level < 1 or self.eval_tasks_per_level < 1:
            raise ValueError("math.train_tasks_per_level and math.eval_tasks_per_level must be >= 1")
        if not self.levels or any(level not in MATH_LEVELS for level in self.levels):
            raise ValueError(f"math.levels must be a non-empty subset of {MATH_LEVELS}, got {self.levels!r}")
        if not self.families or any(family not in MATH_FAMILIES for family in self.families):
            raise ValueError(f"math.families must be a non-empty subset of {tuple(MATH_FAMILIES)}, "
                             f"got {self.families!r}")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    name: str
    runs_dir: str = "runs"
    iterations: int = 3
    seed: int = 0
    model: ModelSpec = ModelSpec()
    mesh: MeshConfig = MeshConfig()
    policy: PolicySection = PolicySection()
    env: Literal["simweb", "webwalker", "math"] = "simweb"  # which section below gives the tasks and tools
    simweb: SimWebSection = SimWebSection()
    webwalker: WebWalkerSection = WebWalkerSection()
    math: MathSection = MathSection()
    agent: AgentSection = AgentSection()
    extract: ExtractSection = ExtractSection()
    injection: InjectionSection = InjectionSection()
    distill: DistillSection = DistillSection()
    trainer: TrainerConfig = TrainerConfig()
    budget: ViewBudget = ViewBudget(8192, 16384)
    eval: EvalSection = EvalSection()
    on_empty: Literal["keep_policy", "stop"] = "keep_policy"  # no informative group / no accepted trajectory
    progress_bar: bool = True

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty folder name, got {self.name!r}")
        positive = {"iterations": self.iterations, "extract.samples": self.extract.samples,
                    "extract.batch_tasks": self.extract.batch_tasks, "extract.max_pool_size": self.extract.max_pool_size,
                    "distill.samples": self.distill.samples, "eval.samples": self.eval.samples,
                    "injection.k": self.injection.k, "agent.max_llm_calls": self.agent.max_llm_calls,
                    "agent.max_tokens": self.agent.max_tokens, "policy.max_batch_size": self.policy.max_batch_size,
                    "simweb.train_tasks_per_level": self.simweb.train_tasks_per_level,
                    "simweb.eval_tasks_per_level": self.simweb.eval_tasks_per_level}
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        for key, value in {"extract.tasks": self.extract.tasks, "distill.tasks": self.distill.tasks,
                           "eval.tasks": self.eval.tasks, "distill.heldout_tasks": self.distill.heldout_tasks,
                           "distill.on_policy.refresh_every": self.distill.on_policy.refresh_every}.items():
            if value < 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        unknown = [m for m in self.eval.modes if m not in MODES]
        if unknown or not self.eval.modes:
            raise ValueError(f"eval.modes={list(self.eval.modes)}: choose a non-empty subset of {list(MODES)}")


def check_config(config: LoopConfig, environ: dict[str, str] | None = None) -> None:
    """What the schema cannot check, before any work: raises ``ConfigError`` naming the key."""
    environ = dict(os.environ if environ is None else environ)
    try:
        config.model.check_exists()
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    needs_endpoint = [key for key, used in (("extract.writer='llm'", config.extract.writer == "llm"),
                                            ("injection.selector='llm'", config.injection.selector == "llm")) if used]
    if needs_endpoint:
        _check_endpoint(config.extract.endpoint, "extract.endpoint", " and ".join(needs_endpoint), environ)
    if config.trainer.step.from_rollout:
        if config.distill.regime != "off_policy":
            raise ConfigError(f"config.trainer.step.teacher='from_rollout': the teacher's signal comes from its own "
                              f"rollouts, which only off_policy trains on (distill.regime={config.distill.regime!r})")
        if config.policy.backend == "reference":
            raise ConfigError("config.trainer.step.teacher='from_rollout': the reference policy records no "
                              "log-probabilities; use policy.backend='local' or 'server'")
    if config.extract.schedule == "release_steps" and config.extract.inject_running_pool:
        raise ConfigError("config.extract.inject_running_pool: under extract.schedule='release_steps' every step "
                          "already rolls out with the pool so far in its prompt; set it False")
    if config.policy.backend == "reference" and config.extract.writer == "self":
        raise ConfigError("config.extract.writer='self': the reference policy is a script and cannot write "
                          "experience; use writer 'offline' or 'llm', or policy.backend='local'")
    if config.injection.selector == "embedding":
        if importlib.util.find_spec("sentence_transformers") is None:
            raise ConfigError("config.injection.selector='embedding' needs the embedding extra: "
                              "pip install -e \".[embedding]\"")
    if config.env != "simweb" and config.policy.backend == "reference":
        raise ConfigError(f"config.policy.backend='reference': the reference policy is SimWeb's scripted agent "
                          f"and cannot act in env {config.env!r}; use policy.backend='local'")
    if config.env == "math" and config.extract.writer == "offline":
        raise ConfigError("config.extract.writer='offline': SimWeb's offline writer reads only search/visit "
                          "trajectories; env 'math' needs writer 'llm' or 'self'")
    if config.env == "webwalker":
        _check_webwalker(config.webwalker, environ)
    if config.policy.backend == "server":
        _check_server(config.policy.server, environ)


def required_env_vars(config: LoopConfig) -> dict[str, str]:
    """The environment variables ``config`` reads API keys from, each with the key that names it."""
    needed: dict[str, str] = {}
    if config.extract.endpoint.api_key_env and (config.extract.writer == "llm" or config.injection.selector == "llm"):
        needed["extract.endpoint.api_key_env"] = config.extract.endpoint.api_key_env
    if config.policy.backend == "server" and config.policy.server.api_key_env:
        needed["policy.server.api_key_env"] = config.policy.server.api_key_env
    if config.env == "webwalker":
        w = config.webwalker
        for key in ("search_api_key_env", "visit_api_key_env"):
            if getattr(w, key):
                needed[f"webwalker.{key}"] = getattr(w, key)
        if w.summarizer.base_url and w.summarizer.api_key_env:
            needed["webwalker.summarizer.api_key_env"] = w.summarizer.api_key_env
        if w.judge == "llm" and w.judge_endpoint.api_key_env:
            needed["webwalker.judge_endpoint.api_key_env"] = w.judge_endpoint.api_key_env
    return needed


def _check_endpoint(endpoint: Endpoint, key: str, why: str, environ: dict[str, str]) -> None:
    if not endpoint.base_url.startswith(("http://", "https://")):
        raise ConfigError(f"config.{key}.base_url={endpoint.base_url!r}: {why} needs an http(s) URL")
    if not endpoint.model:
        raise ConfigError(f"config.{key}.model: {why} needs the endpoint's model name")
    if endpoint.api_key_env and not environ.get(endpoint.api_key_env):
        raise ConfigError(f"config.{key}.api_key_env={endpoint.api_key_env!r}: {why} reads the API key "
                          f"from ${endpoint.api_key_env}, which is not set")


def _check_server(server: ServerSpec, environ: dict[str, str]) -> None:
    try:
        check_command(server.command)
    except ValueError as e:
        raise ConfigError(f"config.policy.server.command={server.command!r}: {e}") from None
    program = shlex.split(server.command)[0]
    path = dict(item.split("=", 1) for item in server.env).get("PATH", environ.get("PATH"))  # the server's own
    if "{" not in program and shutil.which(program, path=path) is None:
        raise ConfigError(f"config.policy.server.command: {program!r} is not an executable on PATH "
                          "(is the inference engine installed here?)")
    if server.api_key_env and not environ.get(server.api_key_env):
        raise ConfigError(f"config.policy.server.api_key_env={server.api_key_env!r}: the policy server's API key "
                          f"is read from ${server.api_key_env}, which is not set")


def _check_webwalker(w: WebWalkerSection, environ: dict[str, str]) -> None:
    if not w.train_file:
        raise ConfigError("config.webwalker.train_file: env 'webwalker' needs a WebWalkerQA-format JSONL file")
    for key, path in (("train_file", w.train_file), ("eval_file", w.eval_file)):
        if path and not Path(path).is_file():
            raise ConfigError(f"config.webwalker.{key}={path!r}: no such file")
    for key, url in (("search_base_url", w.search_base_url), ("visit_base_url", w.visit_base_url)):
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"config.webwalker.{key}={url!r}: needs an http(s) URL")
    for key, name, tool in (("search_api_key_env", w.search_api_key_env, "the search tool (Serper)"),
                            ("visit_api_key_env", w.visit_api_key_env, "the visit tool (Jina)")):
        if not name or not environ.get(name, "").strip():
            raise ConfigError(f"config.webwalker.{key}={name!r}: {tool} reads its API key from ${name}, "
                              "which is not set")
    if w.summarizer.base_url:
        _check_endpoint(w.summarizer, "webwalker.summarizer", "the visit tool's page summarizer", environ)
    if w.judge == "llm":
        _check_endpoint(w.judge_endpoint, "webwalker.judge_endpoint", "webwalker.judge='llm'", environ)
    # The tasks themselves: a malformed line or an empty split fails now rather than mid-run.
    try:
        train, test = webwalker_tasks(w)
    except RecordError as e:
        raise ConfigError(f"config.webwalker: {e}") from None
    for world, tasks in (("training", train), ("held-out", test)):
        if not tasks:
            raise ConfigError(f"config.webwalker: the {world} world has no tasks (train_file={w.train_file!r}, "
                              f"eval_file={w.eval_file!r}, eval_fraction={w.eval_fraction})")


def webwalker_tasks(w: WebWalkerSection) -> tuple[list[Task], list[Task]]:
    """The training and held-out tasks, each in file order, with ``level`` = ``difficulty_level``.

    Without ``eval_file``, the held-out tasks are ``round(eval_fraction * n)`` (at least one of two
    or more) of ``train_file``'s, drawn by ``split_seed`` from the tasks sorted by id: the split
    depends on which tasks the file holds, never on their order."""

    def load(path: str) -> list[Task]:
        return [_with_level(t) for t in load_webqa_tasks(path, include_root_url=w.include_root_url)]

    train = load(w.train_file)
    if w.eval_file:
        return train, load(w.eval_file)
    ids = sorted(t.task_id for t in train)
    random.Random(w.split_seed).shuffle(ids)
    count = max(round(w.eval_fraction * len(ids)), 1) if len(ids) > 1 else 0
    held_out = set(ids[:count])
    return [t for t in train if t.task_id not in held_out], [t for t in train if t.task_id in held_out]


def _with_level(task: Task) -> Task:
    level = task.metadata.get("difficulty_level")
    return dataclasses.replace(task, metadata={**task.metadata, "level": level}) if level else task
