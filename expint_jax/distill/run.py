"""``expint distill``: context-distill a Qwen3 toward its own experience-conditioned self.

    expint distill                                         # configs/distill_cpu_demo.py
    expint distill --config=configs/distill_cpu_demo.py --config.trainer.epochs=3

Inputs: trajectory JSONL files (``data.train`` / ``data.eval``; each ``Trajectory`` carries the
experience its teacher sees: a global block or per-turn step-wise blocks), and a Hugging Face
Qwen3 checkpoint (``model.checkpoint``) or, when that is empty, a tiny random Qwen3. Teacher =
the frozen initial model with experience in context; student = the same weights without it.

With no ``data.train``, the **offline demo data** is built: the scripted SimWeb reference agent
(with seeded mistakes) rolls out on generated tasks, the deterministic offline writer turns the
scored groups into a principle-level pool, and each assistant turn is given the items that the
configured selector picks (``annotate_injections``). Everything is written under
``<output_dir>/data`` and reused on a rerun.

Outputs in ``output_dir``: ``config.json`` (the validated configuration), ``data/``, the
trainer's ``checkpoints/`` and ``metrics/`` (JSONL + TensorBoard), and ``student/``, the trained
student exported as a Hugging Face checkpoint. A killed run resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from expint_jax import storage
from expint_jax.config import ConfigError, bind, to_dict

log = logging.getLogger(__name__)
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "distill_cpu_demo.py"


@dataclasses.dataclass(frozen=True)
class TinyModel:
    """Shape of the random Qwen3 used when no checkpoint is given (real Qwen3 vocabulary)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    init_std: float = 0.02  # a larger std gives a random model that reacts to its context


@dataclasses.dataclass(frozen=True)
class ModelSection:
    checkpoint: str = ""  # Hugging Face Qwen3 directory; "" = tiny random model
    tiny: TinyModel = TinyModel()
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: Literal["none", "dots", "full"] = "none"
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class MeshSection:
    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class DemoData:
    """Offline SimWeb data (used when ``data.train`` is empty)."""

    seed: int = 0
    train_tasks_per_level: int = 8
    eval_tasks_per_level: int = 2
    levels: tuple[str, ...] = ("easy", "medium")
    rollouts_per_task: int = 4
    mistake_rate: float = 0.3  # chance of each scripted mistake, so groups are partly right
    max_pool_size: int = 50
    injection: Literal["global", "stepwise"] = "stepwise"
    selector: Literal["bm25", "all"] = "bm25"
    selector_k: int = 4


@dataclasses.dataclass(frozen=True)
class DataSection:
    train: tuple[str, ...] = ()
    eval: tuple[str, ...] = ()
    max_student_tokens: int = 8192
    max_teacher_tokens: int = 16384
    overflow: Literal["truncate", "drop"] = "truncate"
    demo: DemoData = DemoData()


@dataclasses.dataclass(frozen=True)
class DistillRunConfig:
    output_dir: str
    trainer: dict  # the fields of distill.trainer.TrainerConfig except output_dir (bound separately)
    model: ModelSection = ModelSection()
    mesh: MeshSection = MeshSection()
    data: DataSection = DataSection()
    export_student: bool = True


def _trainer_config(run: DistillRunConfig):
    from expint_jax.distill.trainer import TrainerConfig

    return bind(TrainerConfig, {**run.trainer, "output_dir": str(Path(run.output_dir) / "train")}, "config.trainer")


def demo_trajectories(demo: DemoData, directory: Path):
    """Builds (or reloads) the offline demo's train/eval trajectories and its experience pool."""
    from expint_jax.experience.bank import ExperiencePool, read_pool, write_pool
    from expint_jax.experience.extract.groups import group_rollouts
    from expint_jax.experience.inject import annotate_injections, make_injection
    from expint_jax.experience.offline_writer import OfflineWriterConfig, write_offline
    from expint_jax.experience.select import make_selector
    from expint_jax.records import read_trajectories
    from expint_jax.rollout.envs.simweb import SimWebConfig, SimWebEnv
    from expint_jax.rollout.envs.simweb.reference_agent import Mistakes, run_reference_agent

    paths = {split: directory / f"{split}.jsonl" for split in ("train", "eval")}
    pool_path = directory / "pool.jsonl"
    if all(p.exists() for p in paths.values()) and pool_path.exists():
        return read_trajectories(paths["train"]), read_trajectories(paths["eval"]), read_pool(pool_path)

    rate = demo.mistake_rate
    mistakes = Mistakes(answer_early=rate, wrong_link=rate, skip_hop=rate)
    rollouts = {}
    for split, per_level in (("train", demo.train_tasks_per_level), ("eval", demo.eval_tasks_per_level)):
        env = SimWebEnv(SimWebConfig(seed=demo.seed, split=split, tasks_per_level=per_level, levels=demo.levels))
        rollouts[split] = run_reference_agent(env, n=demo.rollouts_per_task, seed=demo.seed, mistakes=mistakes)
    pool = write_offline(group_rollouts(rollouts["train"]), ExperiencePool(),
                         OfflineWriterConfig(granularity="principle", max_pool_size=demo.max_pool_size), iteration=0)
    spec = make_injection(demo.injection, pool.as_mapping(),
                          make_selector(demo.selector, k=demo.selector_k) if demo.injection == "stepwise" else None)
    annotated = {split: annotate_injections(trajectories, spec) for split, trajectories in rollouts.items()}
    write_pool(pool_path, pool)
    for split, trajectories in annotated.items():
        storage.write_jsonl(paths[split], (t.to_json() for t in trajectories))
    return annotated["train"], annotated["eval"], pool


def _load_models(model: ModelSection, mesh):
    from expint_jax.models.config import DTypePolicy, tiny
    from expint_jax.models.hf import load_checkpoint
    from expint_jax.parallel.placement import init_model

    policy = DTypePolicy(model.param_dtype, model.compute_dtype)
    if model.checkpoint:
        return tuple(load_checkpoint(model.checkpoint, mesh=mesh, policy=policy, remat=remat)
                     for remat in (model.remat, "none"))
    shape = dataclasses.asdict(model.tiny)
    init_std = shape.pop("init_std")
    config = tiny(**shape)
    return tuple(init_model(config, mesh=mesh, policy=policy, remat=remat, init_std=init_std, seed=model.seed)
                 for remat in (model.remat, "none"))


def run(config: DistillRunConfig):
    """Runs (or resumes) a distillation described by ``config``; returns the ``TrainResult``."""
    from expint_jax.distill.data import build_examples
    from expint_jax.distill.trainer import train
    from expint_jax.distill.views import ViewBudget
    from expint_jax.models.chat import ChatFormat
    from expint_jax.models.hf import save_checkpoint
    from expint_jax.models.tokenizer import load_tokenizer
    from expint_jax.parallel.mesh import MeshConfig, make_mesh
    from expint_jax.records import Trajectory, read_jsonl

    out = Path(config.output_dir)
    trainer_config = _trainer_config(config)
    storage.write_json(out / "config.json", to_dict(config))
    tokenizer = load_tokenizer(config.model.checkpoint or None)
    chat = ChatFormat(tokenizer)
    budget = ViewBudget(config.data.max_student_tokens, config.data.max_teacher_tokens, config.data.overflow)

    if config.data.train:
        def records(paths: Sequence[str]):
            return [(where, Trajectory.from_json(obj, where)) for p in paths for where, obj in read_jsonl(p)]

        train_records, eval_records = records(config.data.train), records(config.data.eval)
    else:
        demo_train, demo_eval, pool = demo_trajectories(config.data.demo, out / "data")
        log.info("demo data: %d train / %d eval trajectories, pool of %d lessons", len(demo_train), len(demo_eval),
                 len(pool))
        train_records = [(f"demo train #{i}", t) for i, t in enumerate(demo_train)]
        eval_records = [(f"demo eval #{i}", t) for i, t in enumerate(demo_eval)]
    train_data = build_examples(train_records, chat, budget)
    eval_data = build_examples(eval_records, chat, budget) if eval_records else None

    mesh = make_mesh(MeshConfig(config.mesh.data, config.mesh.fsdp, config.mesh.tensor))
    student, teacher = _load_models(config.model, mesh)
    result = train(trainer_config, student, teacher, train_data, eval_data, mesh=mesh)
    if config.export_student:
        save_checkpoint(student, out / "student", tokenizer=tokenizer)
    return result


def _enable_compilation_cache() -> None:
    """Persistent XLA cache (``$JAX_COMPILATION_CACHE_DIR`` or ``~/.cache/expint_jax/xla``): a rerun
    or a resumed run skips recompiling the step."""
    import os

    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        root = os.environ.get("EXPINT_CACHE_DIR") or str(Path.home() / ".cache" / "expint_jax")
        jax.config.update("jax_compilation_cache_dir", str(Path(root) / "xla"))


def main(argv: list[str] | None = None) -> int:
    from absl import flags
    from ml_collections import config_flags

    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = [f"--config={DEFAULT_CONFIG}", *argv]
    command_line = ["expint distill", *argv]
    flag_values = flags.FlagValues()
    # config_flags reads the --config.<field> overrides from sys_argv, not from the parsed list.
    config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG), "experiment config file", flag_values=flag_values,
                                    lock_config=True, sys_argv=command_line)
    try:
        flag_values(command_line)
        config = bind(DistillRunConfig, flag_values.config)
        _trainer_config(config)  # validate the trainer section before any work starts
    except (flags.Error, ConfigError) as e:
        print(f"expint distill: {e}", file=sys.stderr)
        return 2
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # ml_collections rejecting an override
        detail: object = e
        while isinstance(detail, BaseException) and detail.args:  # unwrap AttributeError(KeyError(text))
            detail = detail.args[0]
        print(f"expint distill: bad configuration override: {str(detail).replace(chr(10), ' ')}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _enable_compilation_cache()
    result = run(config)
    before, after = result.initial_eval_metrics, result.eval_metrics
    print(f"\ndistilled {result.steps} steps ({result.stop_reason}; resumed from step {result.resumed_from})")
    print(f"data: {result.data_counts}")
    if "kl" in after:
        start = f"{before['kl']:.4f} -> " if "kl" in before else ""
        print(f"held-out KL(teacher || student) per token: {start}{after['kl']:.4f}")
    print(f"outputs: {config.output_dir}")
    return 0
