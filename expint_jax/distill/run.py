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

Outputs in ``output_dir``: ``config.json`` (the configuration that ran), ``data/`` (the demo
data), ``train/`` (the trainer's ``checkpoints/`` and ``metrics/``, JSONL + TensorBoard), and
``student/``, the trained student exported as a Hugging Face checkpoint. A killed run resumes from
its last checkpoint.

Trust in what is on disk:
  * Everything is checked before anything is written: the configuration, the checkpoint (loaded),
    the tokenizer, the mesh against the devices, the ``data.train``/``data.eval`` files (parsed
    into examples) and the state of ``output_dir``. A mistake writes nothing.
  * Each output folder holds ``config_key.json``: the configuration values it depends on
    (``ARTEFACTS``) and their hash, written before the folder is built. A rerun whose values
    differ for a folder that exists stops (``StaleOutputError``) naming the folders, the
    differing keys and their values; ``--overwrite`` removes just those folders and rebuilds
    them, reusing the rest (a new ``trainer.epochs`` keeps ``data/``). So ``config.json``, written
    once the checks pass, always describes what made every output beside it. (Files named by
    ``data.train`` are keyed by path, not content.)

Command line: ``--help``; ``--show-config`` prints every field of the resolved configuration and
exits; ``--overwrite`` as above; errors are one line, exit status 2 (``expint --debug`` keeps the
traceback).

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
import hashlib
import json
import logging
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flax import nnx

from expint_jax import storage, xla_cache
from expint_jax.config import bind, format_config, parse_command_line, to_dict
from expint_jax.distill.trainer import TrainerConfig
from expint_jax.distill.views import ViewBudget
from expint_jax.models.source import ModelSpec, build_model
from expint_jax.parallel.mesh import MeshConfig
from expint_jax.rollout.envs.simweb.demo import DemoData, demo_trajectories

log = logging.getLogger(__name__)
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "distill_cpu_demo.py"
KEY_FILE = "config_key.json"
FAKE_DEVICES_HINT = ("on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=8 gives 8 fake devices, or set "
                     "--config.mesh.fsdp=-1 with data=tensor=1 to use what there is")


class StaleOutputError(RuntimeError):
    """``output_dir`` holds outputs made with other configuration values than this run's."""


class InputError(ValueError):
    """An input the run cannot use: data files that give no example, a mesh the devices cannot form."""


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


@dataclasses.dataclass(frozen=True)
class Artefact:
    """An output folder and the configuration it depends on: dotted sections of ``to_dict(config)``,
    less the ``ignored`` ones (display only)."""

    folder: str
    sections: tuple[str, ...]
    ignored: tuple[str, ...] = ()
    only_for_demo: bool = False  # exists only when the demo data is built (no data.train)

    def key(self, config: DistillRunConfig) -> dict[str, Any]:
        plain = to_dict(config)
        key = {section: _dotted(plain, section) for section in self.sections}
        for path in self.ignored:
            section, _, leaf = path.rpartition(".")
            key.get(section, {}).pop(leaf, None)
        return key


_TRAINED_BY = ("model", "mesh", "data", "trainer")
ARTEFACTS = (
    Artefact("data", ("data.demo",), only_for_demo=True),
    Artefact("train", _TRAINED_BY, ignored=("trainer.progress_bar",)),
    Artefact("student", _TRAINED_BY, ignored=("trainer.progress_bar",)),
)


def _dotted(plain: Mapping[str, Any], path: str) -> Any:
    for name in path.split("."):
        plain = plain[name]
    return json.loads(json.dumps(plain))  # tuples as lists: the form the key takes on disk


def key_hash(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return {path: leaf for name, item in value.items() for path, leaf in _flat(item, f"{prefix}.{name}").items()}
    return {prefix: value}


@dataclasses.dataclass(frozen=True)
class StaleOutput:
    """An output folder made with other values: ``differences`` maps ``config.<key>`` to (then, now)."""

    folder: Path
    differences: dict[str, tuple[Any, Any]]
    unmarked: bool = False  # no key file: made before outputs carried one, or by hand


def stale_outputs(config: DistillRunConfig) -> list[StaleOutput]:
    """The output folders of ``config.output_dir`` that this configuration would not have made (read-only)."""
    found = []
    for artefact in ARTEFACTS:
        folder = Path(config.output_dir) / artefact.folder
        if not folder.exists() or (artefact.only_for_demo and config.data.train):
            continue
        marker = folder / KEY_FILE
        if not marker.exists():
            found.append(StaleOutput(folder, {}, unmarked=True))
            continue
        stored = storage.read_json(marker).get("key", {})
        then, now = _flat(stored, "config"), _flat(artefact.key(config), "config")
        differences = {k: (then.get(k), now.get(k)) for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)}
        if differences:
            found.append(StaleOutput(folder, differences))
    return found


def describe_stale(output_dir: str, stale: Sequence[StaleOutput]) -> str:
    """One line: which folders, made with which values, and how to start over."""
    folders = ", ".join(f"{s.folder.name}/" for s in stale)
    differences: dict[str, tuple[Any, Any]] = {}
    for s in stale:
        differences.update(s.differences)
    shown = [f"{key}={then!r} (now {now!r})" for key, (then, now) in list(differences.items())[:6]]
    if len(differences) > 6:
        shown.append(f"and {len(differences) - 6} more")
    why = ("made with " + ", ".join(shown)) if shown else f"made without a {KEY_FILE} (an older version, or by hand)"
    return (f"{output_dir} holds outputs of another configuration: {folders} {why}; rerun with --overwrite to rebuild "
            "them (outputs still valid are kept), or choose a new --config.output_dir")


def _claim(config: DistillRunConfig, artefact: Artefact) -> None:
    """Marks a folder as made by this configuration, before it is built: a killed build resumes
    under the same values, and another configuration is told apart."""
    key = artefact.key(config)
    marker = Path(config.output_dir) / artefact.folder / KEY_FILE
    if not marker.exists() or storage.read_json(marker).get("hash") != key_hash(key):
        storage.write_json(marker, {"hash": key_hash(key), "key": key})


def _remove(stale: Sequence[StaleOutput], echo: Callable[[str], None]) -> None:
    for item in stale:
        echo(f"--overwrite: removing {item.folder}")
        (item.folder / KEY_FILE).unlink(missing_ok=True)  # first: a folder half removed never looks valid
        shutil.rmtree(item.folder)


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
        if data is not None and not data.counts.records:
            raise InputError(f"{sources[split]}: no trajectory records in it (empty files?)")
        if data is not None and not data.examples:
            raise InputError(f"{sources[split]}: none of its {data.counts.records} trajectories gives a usable "
                             f"example (counts: {data.counts.to_json()}); check the files and the length budget "
                             "(config.data.budget)")
    return sets


def run(config: DistillRunConfig, teacher: nnx.Module | None = None, *, overwrite: bool = False,
        echo: Callable[[str], None] = log.info):
    """Runs (or resumes) a distillation described by ``config``; returns the ``TrainResult``.

    ``teacher``: the frozen model whose experience-conditioned distribution the student learns;
    when not given and the step needs one, the run's initial model (``model``) is built again.
    Every input is checked before the first write (see the module docstring); outputs made with
    other values are a ``StaleOutputError``, or removed and rebuilt when ``overwrite``."""
    from expint_jax.distill.trainer import train
    from expint_jax.models.chat import ChatFormat
    from expint_jax.models.hf import save_checkpoint
    from expint_jax.models.tokenizer import load_tokenizer
    from expint_jax.parallel.mesh import make_mesh

    stale = stale_outputs(config)
    if stale and not overwrite:
        raise StaleOutputError(describe_stale(config.output_dir, stale))
    config.model.check_exists()
    tokenizer = load_tokenizer(config.model.checkpoint or None)
    chat = ChatFormat(tokenizer, enable_thinking=config.model.enable_thinking)
    try:
        mesh = make_mesh(config.mesh)
    except ValueError as e:
        raise InputError(f"config.{e}; {FAKE_DEVICES_HINT}") from None
    data = run_examples(config, chat) if config.data.train else None  # the user's files: read, never written
    echo("loading the model" if config.model.checkpoint else "building the tiny random model")
    student = build_model(config.model, mesh, remat=config.model.remat)
    if teacher is None and config.trainer.step.needs_teacher:
        teacher = build_model(config.model, mesh)

    # Every input is checked: from here on the run writes.
    _remove(stale, echo)
    storage.write_json(Path(config.output_dir) / "config.json", to_dict(config))
    by_folder = {artefact.folder: artefact for artefact in ARTEFACTS}
    if data is None:
        _claim(config, by_folder["data"])
        echo("building the offline demo data (scripted SimWeb rollouts, the offline writer's pool, step-wise "
             "selections); reused on a rerun")
        data = run_examples(config, chat)
    _claim(config, by_folder["train"])
    echo("training; its first step compiles the train step with XLA (a minute or more on a CPU with a cold cache, "
         "seconds from the cache)")
    result = train(config.trainer, student, teacher, data["train"], data["eval"], output_dir=train_dir(config),
                   mesh=mesh)
    if config.export_student:
        _claim(config, by_folder["student"])
        echo(f"exporting the student to {student_dir(config)}")
        save_checkpoint(student, student_dir(config), tokenizer=tokenizer)
    return result


HELP = """usage: expint distill [--config=FILE] [--config.<key>=VALUE ...] [--show-config] [--overwrite]
       expint distill RUN_DIR [--iteration K]     (one iteration of an `expint run` directory)

Context-distill a Qwen3 toward its own experience-conditioned self: the teacher (the frozen
initial model) sees the experience, the student (the same weights, trained) does not. Without
data.train, the offline SimWeb demo data is built; without model.checkpoint, a tiny random Qwen3
is used (so the default runs offline on a CPU).

options:
  --config=FILE           the experiment (default: configs/distill_cpu_demo.py)
  --config.<key>=VALUE    override one field, e.g. --config.trainer.epochs=3; --show-config lists them
  --show-config           print every field of the resolved configuration and exit
  --overwrite             rebuild the outputs in output_dir that another configuration made
                          (the rest is reused); without it such a rerun stops and names the keys
  -h, --help              this help

Outputs in output_dir: config.json, data/ (demo data), train/ (checkpoints, metrics), student/
(a Hugging Face checkpoint). Rerunning the same command resumes. Errors are one line, exit
status 2; `expint distill --debug ...` shows the traceback."""


def main(argv: list[str] | None = None) -> int:
    """``expint distill [options]``; a user error is raised for the dispatcher to print on one line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(HELP)
        return 0
    show, overwrite = "--show-config" in argv, "--overwrite" in argv
    argv = [arg for arg in argv if arg not in ("--show-config", "--overwrite")]
    config = bind(DistillRunConfig, parse_command_line("expint distill", argv, DEFAULT_CONFIG))
    if show:
        print(format_config(config))
        return 0
    config.model.check_exists()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    xla_cache.enable()
    result = run(config, overwrite=overwrite, echo=lambda line: print(line, flush=True))
    before, after = result.initial_eval_metrics, result.eval_metrics
    print(f"\ndistilled {result.steps} steps ({result.stop_reason}; resumed from step {result.resumed_from})")
    print(f"data: {result.data_counts}")
    if "kl" in after:
        start = f"{before['kl']:.4f} -> " if "kl" in before else ""
        print(f"held-out KL(teacher || student) per token: {start}{after['kl']:.4f}")
    print(f"outputs: {config.output_dir}")
    return 0
