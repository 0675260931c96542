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

The configuration's sections are the schemas of the parts they configure: ``trainer`` is a
``distill.trainer.TrainerConfig``, ``model`` a ``models.source.ModelSpec``, ``mesh`` a
``parallel.mesh.MeshConfig``, ``data.budget`` a ``distill.views.ViewBudget``, ``data.demo`` a
``rollout.envs.simweb.demo.DemoData``; their defaults are defined there and nowhere else.

Reading a run back (notebooks): ``load_run_config(output_dir)``, ``run_examples`` (the run's
examples, built with its own length budget), ``models.source.build_model(config.model)`` (the
teacher = the untrained student), ``models.source.load_model(student_dir(config), config.model)``
(the exported student) and ``train_dir(config)`` (the trainer's metrics and checkpoints).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from flax import nnx

from expint_jax import storage, xla_cache
from expint_jax.config import ConfigError, bind, parse_command_line, to_dict
from expint_jax.distill.trainer import TrainerConfig
from expint_jax.distill.views import ViewBudget
from expint_jax.models.source import ModelSpec, build_model
from expint_jax.parallel.mesh import MeshConfig
from expint_jax.rollout.envs.simweb.demo import DemoData, demo_trajectories

log = logging.getLogger(__name__)
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "distill_cpu_demo.py"


@dataclasses.dataclass(frozen=True)
class DataSection:
    train: tuple[str, ...] = ()  # trajectory JSONL files; empty = the offline SimWeb demo data
    eval: tuple[str, ...] = ()
    budget: ViewBudget = ViewBudget()
    demo: DemoData = DemoData()


@dataclasses.dataclass(frozen=True)
class DistillRunConfig:
    output_dir: str
    trainer: TrainerConfig = TrainerConfig()
    model: ModelSpec = ModelSpec()
    mesh: MeshConfig = MeshConfig()
    data: DataSection = DataSection()
    export_student: bool = True


def load_run_config(output_dir: str | Path) -> DistillRunConfig:
    """The configuration a run saved in ``<output_dir>/config.json``, with ``output_dir`` set to the
    given path (so that a run moved or read from another working directory is found)."""
    path = Path(output_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no config.json; is {output_dir} the output_dir of an `expint distill` run?")
    return dataclasses.replace(bind(DistillRunConfig, storage.read_json(path), str(path)), output_dir=str(output_dir))


def train_dir(config: DistillRunConfig) -> Path:
    """The trainer's run directory (checkpoints, metrics)."""
    return Path(config.output_dir) / "train"


def student_dir(config: DistillRunConfig) -> Path:
    """Where a finished run exported its student (a Hugging Face checkpoint; ``models.source.load_model``)."""
    return Path(config.output_dir) / "student"


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
    budget = config.data.budget
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
                             "(config.data.budget)")
    return sets


def run(config: DistillRunConfig, teacher: nnx.Module | None = None):
    """Runs (or resumes) a distillation described by ``config``; returns the ``TrainResult``.

    ``teacher``: the frozen model whose experience-conditioned distribution the student learns;
    when not given and the step needs one, the run's initial model (``model``) is built again."""
    from expint_jax.distill.trainer import train
    from expint_jax.models.chat import ChatFormat
    from expint_jax.models.hf import save_checkpoint
    from expint_jax.models.tokenizer import load_tokenizer
    from expint_jax.parallel.mesh import make_mesh

    storage.write_json(Path(config.output_dir) / "config.json", to_dict(config))
    tokenizer = load_tokenizer(config.model.checkpoint or None)
    data = run_examples(config, ChatFormat(tokenizer))

    mesh = make_mesh(config.mesh)
    student = build_model(config.model, mesh, remat=config.model.remat)
    if teacher is None and config.trainer.step.needs_teacher:
        teacher = build_model(config.model, mesh)
    result = train(config.trainer, student, teacher, data["train"], data["eval"], output_dir=train_dir(config),
                   mesh=mesh)
    if config.export_student:
        save_checkpoint(student, student_dir(config), tokenizer=tokenizer)
    return result


def main(argv: list[str] | None = None) -> int:
    try:
        config = bind(DistillRunConfig, parse_command_line("expint distill", sys.argv[1:] if argv is None else argv,
                                                           DEFAULT_CONFIG))
        config.model.check_exists()
    except (ConfigError, FileNotFoundError) as e:
        print(f"expint distill: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    xla_cache.enable()
    result = run(config)
    before, after = result.initial_eval_metrics, result.eval_metrics
    print(f"\ndistilled {result.steps} steps ({result.stop_reason}; resumed from step {result.resumed_from})")
    print(f"data: {result.data_counts}")
    if "kl" in after:
        start = f"{before['kl']:.4f} -> " if "kl" in before else ""
        print(f"held-out KL(teacher || student) per token: {start}{after['kl']:.4f}")
    print(f"outputs: {config.output_dir}")
    return 0
