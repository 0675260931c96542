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

``model.param_dtype="bfloat16"`` trains bfloat16 weights through float32 master weights in the
optimizer state; ``model.compute_dtype="bfloat16"`` with float32 parameters is the usual choice.

Reading a run back (notebooks): ``load_run_config(output_dir)``, ``trainer_config``,
``run_examples`` (the run's examples, built with its own length budget), ``initial_model`` (the
teacher = the untrained student) and ``trained_student`` (the exported student).
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


def trainer_config(run: DistillRunConfig):
    """The run's ``TrainerConfig`` (validated; its output directory is ``<output_dir>/train``)."""
    from expint_jax.distill.trainer import TrainerConfig

    return bind(TrainerConfig, {**run.trainer, "output_dir": str(Path(run.output_dir) / "train")}, "config.trainer")


def load_run_config(output_dir: str | Path) -> DistillRunConfig:
    """The configuration a run saved in ``<output_dir>/config.json``, with ``output_dir`` set to the
    given path (so that a run moved or read from another working directory is found)."""
    path = Path(output_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no config.json; is {output_dir} the output_dir of an `expint distill` run?")
    return dataclasses.replace(bind(DistillRunConfig, storage.read_json(path), str(path)), output_dir=str(output_dir))


def view_budget(config: DistillRunConfig):
    """The length budget of the run's views (``config.data``)."""
    from expint_jax.distill.views import ViewBudget

    return ViewBudget(config.data.max_student_tokens, config.data.max_teacher_tokens, config.data.overflow)


def demo_trajectories(demo: DemoData, directory: Path):
    """Builds (or reloads) the offline demo's train/eval trajectories and its experience pool."""
    from expint_jax.experience.bank import ExperiencePool, read_pool, write_pool
    from expint_jax.experience.extract.groups import group_rollouts
    from expint_jax.experience.inject import annotate_injections, make_injection
    from expint_jax.rollout.envs.simweb.writer import OfflineWriterConfig, write_offline
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


def run_examples(config: DistillRunConfig, chat, splits: Sequence[str] = ("train", "eval")) -> dict:
    """``{split: ExampleSet | None}``: the run's train/eval examples, built with the run's own length
    budget from ``data.train`` / ``data.eval`` or, without ``data.train``, from the offline demo
    data (built under ``<output_dir>/data`` on first use). ``None``: the split has no records
    (no eval files). A split whose records all fail to give an example (too long, no assistant
    turn, unalignable) is an error naming its files."""
    from expint_jax.distill.pipeline import build_examples, load_examples

    unknown = set(splits) - {"train", "eval"}
    if unknown:
        raise ValueError(f"run_examples: unknown splits {sorted(unknown)}; choose from 'train', 'eval'")
    budget = view_budget(config)
    if config.data.train:
        paths = {"train": config.data.train, "eval": config.data.eval}
        sets = {split: load_examples(paths[split], chat, budget) if paths[split] else None for split in splits}
        sources = {split: f"config.data.{split}={list(paths[split])}" for split in splits}
    else:
        directory = Path(config.output_dir) / "data"
        demo_train, demo_eval, pool = demo_trajectories(config.data.demo, directory)
        demo = {"train": demo_train, "eval": demo_eval}
        log.info("demo data: %d train / %d eval trajectories, pool of %d lessons", len(demo_train), len(demo_eval),
                 len(pool))
        sets = {split: build_examples([(f"{directory / split}.jsonl:{i + 1}", t) for i, t in enumerate(demo[split])],
                                      chat, budget) if demo[split] else None for split in splits}
        sources = {split: f"the demo data {directory / split}.jsonl" for split in splits}
    for split, data in sets.items():
        if data is not None and not data.examples:
            raise ValueError(f"{sources[split]}: none of its {data.counts.records} trajectories gives a usable "
                             f"example (counts: {data.counts.to_json()}); check the files and the length budget "
                             "(config.data.max_student_tokens / max_teacher_tokens / overflow)")
    return sets


def initial_model(config: DistillRunConfig, mesh=None, *, remat: str = "none"):
    """The run's initial model: ``model.checkpoint`` or the seeded tiny random Qwen3, in the run's
    dtypes. It is both the teacher and the untrained student."""
    from expint_jax.models.config import DTypePolicy, tiny
    from expint_jax.models.hf import load_checkpoint
    from expint_jax.models.init import init_model

    model = config.model
    policy = DTypePolicy(model.param_dtype, model.compute_dtype)
    if model.checkpoint:
        return load_checkpoint(model.checkpoint, mesh=mesh, policy=policy, remat=remat)
    shape = dataclasses.asdict(model.tiny)
    init_std = shape.pop("init_std")
    return init_model(tiny(**shape), mesh=mesh, policy=policy, remat=remat, init_std=init_std, seed=model.seed)


def trained_student(config: DistillRunConfig, mesh=None, *, remat: str = "none"):
    """The trained student a finished run exported to ``<output_dir>/student``, in the run's dtypes."""
    from expint_jax.models.config import DTypePolicy
    from expint_jax.models.hf import load_checkpoint

    directory = Path(config.output_dir) / "student"
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"{directory}: no exported student; the run has not finished or ran with "
                                "export_student=False")
    policy = DTypePolicy(config.model.param_dtype, config.model.compute_dtype)
    return load_checkpoint(directory, mesh=mesh, policy=policy, remat=remat)


def run(config: DistillRunConfig):
    """Runs (or resumes) a distillation described by ``config``; returns the ``TrainResult``."""
    from expint_jax.distill.trainer import train
    from expint_jax.models.chat import ChatFormat
    from expint_jax.models.hf import save_checkpoint
    from expint_jax.models.tokenizer import load_tokenizer
    from expint_jax.parallel.mesh import MeshConfig, make_mesh

    out = Path(config.output_dir)
    train_config = trainer_config(config)
    storage.write_json(out / "config.json", to_dict(config))
    tokenizer = load_tokenizer(config.model.checkpoint or None)
    data = run_examples(config, ChatFormat(tokenizer))

    mesh = make_mesh(MeshConfig(config.mesh.data, config.mesh.fsdp, config.mesh.tensor))
    student = initial_model(config, mesh, remat=config.model.remat)
    step = train_config.step
    teacher = initial_model(config, mesh) if step.needs_teacher else None
    result = train(train_config, student, teacher, data["train"], data["eval"], mesh=mesh)
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
        trainer_config(config)  # validate the trainer section before any work starts
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
