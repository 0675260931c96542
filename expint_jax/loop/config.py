"""The schema of ``expint run``: one typed section per concern, validated before any work starts.

Every section is a frozen dataclass whose defaults are the single source of defaults; config files
(``configs/*.py``) set only what differs. ``check_config`` adds the checks a schema cannot state
(files that must exist, environment variables a writer endpoint needs, combinations of choices)
and raises ``ConfigError`` with one line naming the key.

Task split (SimWeb): the training world (``split="train"``) gives the extraction tasks (the first
``extract.tasks``) and the distillation tasks (the first ``distill.tasks``; the paper uses the
same tasks for both); the held-out world (``split="test"``) gives the evaluation tasks and the
fixed held-out teacher trajectories the KL is measured on (the first ``distill.heldout_tasks``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Literal

from expint_jax.config import ConfigError
from expint_jax.distill.trainer import TrainerConfig
from expint_jax.distill.views import ViewBudget
from expint_jax.models.source import ModelSpec
from expint_jax.parallel.mesh import MeshConfig

MODES = ("none", "global", "stepwise")


@dataclasses.dataclass(frozen=True)
class PolicySection:
    """Who acts. ``local``: π_k itself through the local JAX engine. ``reference``: SimWeb's scripted
    agent (``ReferencePolicy``) stands in for the model in every rollout, so that every stage sees
    real data on a CPU; the weights are still trained and exported, but they do not act."""

    backend: Literal["local", "reference"] = "local"
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
class ExtractSection:
    tasks: int = 0  # extraction tasks (the first N of the training world); 0 = all
    samples: int = 4  # rollouts of π_k per extraction task
    granularity: Literal["principle", "instance"] = "principle"
    writer: Literal["offline", "llm", "self"] = "offline"
    endpoint: Endpoint = Endpoint()  # writer "llm" (and selector "llm")
    max_pool_size: int = 50
    warm_start: bool = False  # E_k starts from E_{k-1} (False: from an empty pool)
    inject_running_pool: bool = False  # the pool built so far is injected globally into later batches
    batch_tasks: int = 8  # tasks per rollout batch: the unit of resume (and of the running pool)
    temperature: float = 0.0  # writer sampling (self / llm)
    max_tokens: int = 8192


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
class LoopConfig:
    name: str
    runs_dir: str = "runs"
    iterations: int = 3
    seed: int = 0
    model: ModelSpec = ModelSpec()
    mesh: MeshConfig = MeshConfig()
    policy: PolicySection = PolicySection()
    simweb: SimWebSection = SimWebSection()
    agent: AgentSection = AgentSection()
    extract: ExtractSection = ExtractSection()
    injection: InjectionSection = InjectionSection()
    distill: DistillSection = DistillSection()
    trainer: TrainerConfig = TrainerConfig()
    budget: ViewBudget = ViewBudget(8192, 16384)
    eval: EvalSection = EvalSection()
    on_empty: Literal["keep_policy", "stop"] = "keep_policy"  # no informative group / no accepted trajectory
    export_hf_each_iteration: bool = True  # π_{k+1} as a Hugging Face directory servable by vLLM/SGLang
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
        endpoint = config.extract.endpoint
        why = " and ".join(needs_endpoint)
        if not endpoint.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"config.extract.endpoint.base_url={endpoint.base_url!r}: {why} needs an http(s) URL")
        if not endpoint.model:
            raise ConfigError(f"config.extract.endpoint.model: {why} needs the endpoint's model name")
        if endpoint.api_key_env and not environ.get(endpoint.api_key_env):
            raise ConfigError(f"config.extract.endpoint.api_key_env={endpoint.api_key_env!r}: {why} reads the API key "
                              f"from ${endpoint.api_key_env}, which is not set")
    if config.policy.backend == "reference" and config.extract.writer == "self":
        raise ConfigError("config.extract.writer='self': the reference policy is a script and cannot write "
                          "experience; use writer 'offline' or 'llm', or policy.backend='local'")
    if config.injection.selector == "embedding":
        if importlib.util.find_spec("sentence_transformers") is None:
            raise ConfigError("config.injection.selector='embedding' needs the embedding extra: "
                              "pip install -e \".[embedding]\"")
