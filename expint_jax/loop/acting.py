"""Acting in the loop: the worlds, the acting backend of a policy, resumable batched rollouts.

  * ``Worlds``: the training world (extraction + distillation tasks) and the held-out world
    (evaluation + held-out KL tasks) of a run, in the environment ``config.env`` names: SimWeb
    (two seeded splits), WebWalkerQA (``loop.config.webwalker_tasks``: a train file and an eval file, or one
    file split by a seeded fraction; live Serper/Jina tools and a judge) or math (two seeded
    splits, the sandboxed python tool). Each world is an ``Environment`` (``tasks()``,
    ``tools(task)``, ``score``) whose tasks carry a ``level`` where the source has one. Building
    the WebWalkerQA worlds reads the tools' API keys (``WebToolConfigError`` when one is missing;
    ``check_config`` says so first). ``pick(tasks, n)``: the first ``n`` tasks in level-interleaved
    order (easy, medium, hard, easy, ...), so every level is represented.
  * ``acting_backend(config, model, tokenizer, mesh)``: the ``ChatBackend`` that acts for π_k:
    the local engine holding ``model``'s weights, or SimWeb's scripted ``ReferencePolicy``.
  * ``Actors``: who acts for a policy given by its Hugging Face directory during one stage; with
    ``policy.backend='server'`` an inference server of that directory (``llm.server``), kept up
    while the stage asks for the same policy and stopped by ``close()`` (the driver calls it when
    the stage ends, however it ends).
  * ``rollouts(...)``: ``n`` rollouts per task with the ReAct agent under an injection spec, in
    batches of tasks; each finished batch is written to ``<directory>/<prefix>_<b>.jsonl`` at once
    and reused on a rerun, so a killed stage redoes at most one batch. Rollout seeds derive from
    (seed, task, member, step) alone, so the batching never changes a rollout.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from expint_jax import storage
from expint_jax.config import to_dict
from expint_jax.experience.inject import InjectionSpec, NoInjection
from expint_jax.llm.base import ChatBackend
from expint_jax.llm.server import PolicyServer
from expint_jax.loop.layout import key_hash
from expint_jax.loop.config import Endpoint, LoopConfig, PolicySection, WebWalkerSection, webwalker_tasks
from expint_jax.organism import check_unseen_world, check_url_style
from expint_jax.records import Message, SamplingParams, Trajectory, read_trajectories
from expint_jax.rollout.agent import AgentConfig, ReActAgent
from expint_jax.rollout.envs.base import Environment, Task
from expint_jax.rollout.envs.simweb import SimWebConfig, SimWebEnv
from expint_jax.token_signal import TrajectorySignal, read_signals, signal_path, write_signals


@dataclasses.dataclass(frozen=True)
class Worlds:
    train: Environment
    test: Environment

    @classmethod
    def of(cls, config: LoopConfig) -> Worlds:
        if config.env == "webwalker":
            return _webwalker_worlds(config.webwalker)
        if config.env == "math":
            from expint_jax.rollout.envs.math import MathConfig, MathEnv

            m = config.math
            return cls(MathEnv(MathConfig(seed=m.seed, split=m.train_split, tasks_per_level=m.train_tasks_per_level,
                                          levels=m.levels, families=m.families)),
                       MathEnv(MathConfig(seed=m.seed, split=m.test_split, tasks_per_level=m.eval_tasks_per_level,
                                          levels=m.levels, families=m.families)))
        s = config.simweb
        check_unseen_world(config.model.checkpoint, s.seed)
        check_url_style(config.model.checkpoint, s.url_style)
        return cls(SimWebEnv(SimWebConfig(seed=s.seed, split="train", tasks_per_level=s.train_tasks_per_level,
                                          levels=s.levels, url_style=s.url_style)),
                   SimWebEnv(SimWebConfig(seed=s.seed, split="test", tasks_per_level=s.eval_tasks_per_level,
                                          levels=s.levels, url_style=s.url_style)))


def _webwalker_worlds(w: WebWalkerSection) -> Worlds:
    from expint_jax.rollout.envs.web import JinaVisit, SerperSearch
    from expint_jax.rollout.envs.webwalker import WebQAEnv
    from expint_jax.rollout.judge import ExactMatchJudge, Judge, LLMJudge

    train, test = webwalker_tasks(w)
    search = SerperSearch(api_key_env=w.search_api_key_env, base_url=w.search_base_url, top_k=w.search_top_k)
    summarizer = _endpoint_backend(w.summarizer) if w.summarizer.base_url else None
    visit = JinaVisit(summarizer, api_key_env=w.visit_api_key_env, base_url=w.visit_base_url,
                      max_page_chars=w.max_page_chars)
    judges: tuple[Judge, Judge]
    if w.judge == "llm":
        backend = _endpoint_backend(w.judge_endpoint)
        judges = (LLMJudge(backend, family=w.train_judge, parsing=w.judge_parsing),
                  LLMJudge(backend, family=w.eval_judge, parsing=w.judge_parsing))
    else:
        judges = (ExactMatchJudge(containment=True),) * 2
    # One set of tools serves both worlds (they hold no per-world state); each world has its judge.
    return Worlds(WebQAEnv(train, search, visit, judges[0]), WebQAEnv(test, search, visit, judges[1]))


def _endpoint_backend(e: Endpoint) -> ChatBackend:
    from expint_jax.llm.http import RetryPolicy
    from expint_jax.llm.openai import OpenAICompatible

    return OpenAICompatible(e.base_url, e.model, api_key_env=e.api_key_env or None, max_concurrency=e.max_concurrency,
                            retry=RetryPolicy(max_attempts=e.max_attempts, timeout_s=e.timeout_s))


def pick(tasks: Sequence[Task], n: int) -> list[Task]:
    """The first ``n`` tasks (0: all) in level-interleaved order."""
    by_level: dict[str, list[Task]] = {}
    for task in tasks:
        by_level.setdefault(str(task.metadata.get("level", "")), []).append(task)
    lists = list(by_level.values())
    longest = max((len(x) for x in lists), default=0)
    interleaved = [x[i] for i in range(longest) for x in lists if i < len(x)]
    return interleaved if n == 0 else interleaved[:n]


def levels_of(tasks: Sequence[Task]) -> dict[str, str]:
    return {t.task_id: str(t.metadata.get("level", "")) for t in tasks if t.metadata.get("level")}


def acting_backend(config: LoopConfig, model: Any, tokenizer: Any, mesh: Any) -> ChatBackend:
    """The backend that acts for the policy held by ``model`` (ignored by the reference backend)."""
    if config.policy.backend == "reference":
        from expint_jax.rollout.envs.simweb.reference_agent import Mistakes, ReferenceAgentConfig, ReferencePolicy

        from expint_jax.rollout.envs.simweb.sensitivity import Sensitivity

        rate = config.policy.reference_mistake_rate
        return ReferencePolicy(ReferenceAgentConfig(
            mistakes=Mistakes(answer_early=rate, wrong_link=rate, skip_hop=rate),
            sensitivity=Sensitivity() if config.policy.reference_sensitive else None))
    from expint_jax.llm.local import LocalEngine

    return LocalEngine(model, tokenizer, mesh=mesh, max_batch_size=config.policy.max_batch_size,
                       max_context=config.policy.max_context, enable_thinking=config.model.enable_thinking)


def policy_key(policy: PolicySection) -> dict[str, Any]:
    """The ``policy`` settings in the keys of the stages where the policy acts. A server's command
    (engine, dtype, flags) can change what the policy does; its port, host, time-outs and client
    settings cannot and are left out, and without a server the key is what it was before servers."""
    values = to_dict(policy)
    server = values.pop("server")
    if policy.backend == "server":
        values["server"] = {"command": server["command"]}
    return values


class Actors:
    """The backends acting for policies during one stage (module docstring).

    ``backend(checkpoint, load, log_dir)``: ``checkpoint`` is the policy's Hugging Face directory
    (None: π_0, which is ``model.checkpoint`` or, for the tiny random model, ``load()`` exported
    once under ``run_dir``, in a folder named by the model section's hash); ``load()`` builds the
    model for the local engine. The server backend
    starts one server at a time, logging to ``log_dir/server.log``: asking for another checkpoint
    stops the running one first, so two policies never hold the accelerators at once."""

    def __init__(self, config: LoopConfig, tokenizer: Any, mesh: Any, run_dir: Path,
                 count_tokens: Callable[[Sequence[Message]], int] | None = None):
        self.config, self.tokenizer, self.mesh = config, tokenizer, mesh
        self.base_dir = run_dir / f"base_policy_{key_hash(to_dict(config.model))}"
        self.count_tokens = count_tokens
        self._server: PolicyServer | None = None
        self._backend: ChatBackend | None = None

    def backend(self, checkpoint: Path | None, load: Callable[[], Any], log_dir: Path) -> ChatBackend:
        if self.config.policy.backend != "server":
            return acting_backend(self.config, None if self.config.policy.backend == "reference" else load(),
                                  self.tokenizer, self.mesh)
        directory = checkpoint or self._base_checkpoint(load)
        if self._server is not None and self._server.checkpoint == directory:
            assert self._backend is not None
            return self._backend
        self.close()
        self._server = PolicyServer(self.config.policy.server, directory, log_dir / "server.log").start()
        # Thinking off travels as chat_template_kwargs; the default sends nothing (as before).
        self._backend = self._server.backend(self.count_tokens,
                                             enable_thinking=None if self.config.model.enable_thinking else False)
        return self._backend

    def close(self) -> None:
        """Stops the running server, if any."""
        server, self._server, self._backend = self._server, None, None
        if server is not None:
            server.stop()

    def _base_checkpoint(self, load: Callable[[], Any]) -> Path:
        if self.config.model.checkpoint:
            return Path(self.config.model.checkpoint)
        if not (self.base_dir / "config.json").exists():  # save_checkpoint publishes the folder whole
            from expint_jax.models.hf import save_checkpoint

            save_checkpoint(load(), self.base_dir, tokenizer=self.tokenizer)
        return self.base_dir


def agent_config(config: LoopConfig) -> AgentConfig:
    a = config.agent
    return AgentConfig(max_llm_calls=a.max_llm_calls, max_context_tokens=a.max_context_tokens,
                       sampling=SamplingParams(temperature=a.temperature, top_p=a.top_p, max_tokens=a.max_tokens,
                                               presence_penalty=a.presence_penalty))


def rollouts(
    backend: ChatBackend,
    agent: AgentConfig,
    env: Environment,
    tasks: Sequence[Task],
    *,
    samples: int,
    seed: int,
    directory: Path,
    prefix: str,
    batch_tasks: int,
    injection: InjectionSpec | Callable[[int], InjectionSpec] = NoInjection(),
    after_batch: Callable[[int, list[Trajectory]], None] | None = None,
    progress: bool = True,
    signal_top_k: int = 0,
) -> list[Trajectory]:
    """``samples`` rollouts per task, task-major, resumable per batch (see the module docstring).

    ``injection`` may be a function of the batch index (the running pool of the extraction
    rollouts); ``after_batch(b, trajectories)`` runs after batch ``b`` is on disk and after a
    reused batch is read back, in batch order. ``signal_top_k > 0``: the backend also records
    its top-k + tail log-probabilities at every token it writes, kept in each batch file's sidecar
    (``token_signal.signal_path``; the sidecar is written first, so a batch file implies its
    sidecar); ``read_signals(directory, prefix)`` reads them back in the same order."""
    spec_for = injection if callable(injection) else (lambda _b: injection)
    acting = agent if not signal_top_k else dataclasses.replace(
        agent, sampling=dataclasses.replace(agent.sampling, top_logprobs=signal_top_k))
    count = math.ceil(len(tasks) / batch_tasks) if tasks else 0
    found: list[Trajectory] = []
    correct = 0
    with tqdm(total=len(tasks), desc=prefix, unit="task", disable=not progress, leave=False) as bar:
        for b in range(count):
            path = directory / f"{prefix}_{b:04d}.jsonl"
            batch = list(tasks[b * batch_tasks:(b + 1) * batch_tasks])
            if path.exists():
                done = read_trajectories(path)
            else:
                pairs = ReActAgent(backend, acting, spec_for(b)).run_batch_with_signal(batch, env, n=samples,
                                                                                       seed=seed)
                done = [t for t, _ in pairs]
                if signal_top_k:
                    write_signals(signal_path(path), [signal for _, signal in pairs])
                storage.write_jsonl(path, (t.to_json() for t in done))
            found.extend(done)
            correct += sum((t.reward or 0.0) >= 0.5 for t in done)
            bar.update(len(batch))
            bar.set_postfix(accuracy=f"{correct / max(len(found), 1):.3f}")
            if after_batch is not None:
                after_batch(b, done)
    return found


def _batch_files(directory: Path, prefix: str) -> list[Path]:
    return sorted(directory.glob(f"{prefix}_[0-9]*.jsonl"))


def read_rollouts(directory: Path, prefix: str) -> list[Trajectory]:
    """The trajectories of every ``<prefix>_<b>.jsonl`` batch, in the order ``rollouts`` returned them."""
    return [t for path in _batch_files(directory, prefix) for t in read_trajectories(path)]


def read_batch_signals(directory: Path, prefix: str) -> list[TrajectorySignal]:
    """The recorded signals of every ``<prefix>_<b>.jsonl`` batch, in the order ``rollouts`` returned them."""
    return [signal for path in _batch_files(directory, prefix) for signal in read_signals(signal_path(path))]
