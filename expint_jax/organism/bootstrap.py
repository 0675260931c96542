"""π_0 of the SimWeb model organism: a small Qwen3 trained from scratch on the scripted agent's trajectories.

``bootstrap(config, out)`` (``expint organism bootstrap --out DIR``) does:
  1. the copy drills (``organism.drills``) and the bootstrap trajectories (``organism.data``: the
     experience-sensitive scripted agent), each on SimWeb worlds of its own, disjoint from the
     loop's: ``lm_corpus`` (no experience) and ``corpus`` (a mix of contexts);
  2. a sub-vocabulary of the Qwen3 tokenizer (``models.subvocab``) from those texts, the
     lessons, the experience blocks and the agent's fixed texts, so the output layer has a few
     thousand rows instead of 151,936 while the tokenization of SimWeb text stays Qwen3's;
  3. a Qwen3 of ``OrganismConfig.shape`` (tied embeddings) initialised from ``seed`` and trained by
     the distillation trainer in up to three phases (``Phase.epochs=0`` skips one):
       0. ``drill``: the ``nll`` loss on the drills' replies (a page and one request: open a
          link, read a fact, repeat lines), the copying that every later phase relies on;
       a. ``lm``: language modelling on every token of the ``lm_corpus`` conversations (``targets="all"``)
          after their system prompt: the question, pages, search results and the agent's turns
          alike. Copying names and URLs from the context is most of what acting on SimWeb takes,
          and every token of a trajectory practises it, where the agent's own turns are a sixth
          of the tokens; the system prompt (the same 400 tokens every time) is left to phase b;
       b. ``sft``: the ``nll`` loss on the agent's turns of ``corpus`` in the *teacher's* layout
          (``StepConfig(student_view="teacher")``): every assistant turn is learned with exactly
          the experience that turn saw in context (global block, or its own step-wise block);
  4. the Hugging Face directory ``DIR/`` (``model.safetensors``, ``config.json``, tokenizer files,
     ``subvocab.json``) and ``DIR/organism.json``: the configuration, the seed, the command, the
     data counts and the final training loss of each phase. The trainer's work directory
     (``DIR.train/drill``, ``DIR.train/lm``, ``DIR.train/sft``) holds checkpoints, so a killed bootstrap resumes; it is
     removed once the export is written.

Everything is seeded: the same configuration gives the same trajectories, vocabulary and initial
weights (training is deterministic on one machine, up to XLA's CPU reductions across machines).
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from expint_jax import storage
from expint_jax.distill.losses import Divergence
from expint_jax.distill.optim import OptimizerConfig
from expint_jax.distill.pipeline import BatchingConfig, build_examples
from expint_jax.distill.step import StepConfig
from expint_jax.distill.trainer import TrainerConfig, train
from expint_jax.distill.views import ViewBudget
from expint_jax.experience.inject import STEP_HEADER, STEPWISE_SYSTEM_NOTE, format_global_block
from expint_jax.models.chat import ChatFormat
from expint_jax.models.config import Qwen3Config
from expint_jax.models.hf import load_checkpoint, save_checkpoint
from expint_jax.models.init import init_model
from expint_jax.models.subvocab import SubVocabulary
from expint_jax.models.tokenizer import load_tokenizer
from expint_jax.organism import RECORD_FILE, read_record
from expint_jax.organism.data import ContextMix, CorpusConfig, bootstrap_trajectories
from expint_jax.organism.drills import DrillConfig, drills
from expint_jax.records import Trajectory
from expint_jax.rollout import prompts
from expint_jax.rollout.envs.simweb.lessons import PRINCIPLE_LESSONS


@dataclasses.dataclass(frozen=True)
class OrganismShape:
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    # Qwen3's 1e6 is for 40K-token contexts; the organism's are 4K, where RoPE's usual 1e4 gives
    # every head a finer sense of "the token after this one", which copying names and URLs needs.
    rope_theta: float = 10_000.0


NO_EXPERIENCE = ContextMix(none=1.0, global_=0.0, stepwise=0.0, stepwise_random=0.0, stepwise_instance=0.0)


@dataclasses.dataclass(frozen=True)
class Phase:
    epochs: int  # 0: skip the phase
    learning_rate: float
    warmup_steps: int = 50
    rows: int = 8  # conversations per training batch
    min_bucket: int = 512  # shortest padded length (batch shapes are few, so XLA compiles few programs)

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.learning_rate <= 0 or self.warmup_steps < 0 or self.rows < 1:
            raise ValueError(f"Phase needs epochs >= 0, learning_rate > 0, warmup_steps >= 0, rows >= 1; got {self}")


@dataclasses.dataclass(frozen=True)
class OrganismConfig:
    drills: DrillConfig = DrillConfig()
    lm_corpus: CorpusConfig = CorpusConfig(seeds=tuple(range(201, 213)), samples=1, mix=NO_EXPERIENCE)
    corpus: CorpusConfig = CorpusConfig()
    shape: OrganismShape = OrganismShape()
    vocab_tokens: int = 8192  # corpus tokens kept before the merge-path closure and the added tokens
    # Tokens used fewer times are left out (their words split into kept pieces). A token the network
    # rarely sees keeps a near-random embedding, and with tied embeddings it can then never be
    # written, so a name holding one cannot be copied (org9 in docs/organism.md: 8.5 nats per such token).
    vocab_min_count: int = 1
    seed: int = 0
    init_std: float = 0.02
    drill: Phase = Phase(epochs=2, learning_rate=3e-3, rows=32, min_bucket=128)  # phase 0: copy drills
    lm: Phase = Phase(epochs=2, learning_rate=3e-3)  # phase a: language modelling on every token
    sft: Phase = Phase(epochs=3, learning_rate=1e-3)  # phase b: the agent's turns, experience in context
    budget: ViewBudget = ViewBudget(max_student_tokens=4096, max_teacher_tokens=8192)

    def __post_init__(self) -> None:
        # Only the worlds this run reads: a skipped phase's corpus is never built.
        named = {"drills": self.drills.seeds if self.drill.epochs else (),
                 "lm_corpus": self.lm_corpus.seeds if self.lm.epochs else (), "corpus": self.corpus.seeds}
        for first, second in itertools.combinations(named, 2):
            shared = sorted(set(named[first]) & set(named[second]))
            if shared:
                raise ValueError(f"OrganismConfig: seeds {shared} are in both {first} and {second}; "
                                 "give each its worlds")

    def trainer(self, phase: Phase, student_view: str) -> TrainerConfig:
        return TrainerConfig(
            step=StepConfig(Divergence("nll"), chunk_size=512, student_view=student_view),
            batching=BatchingConfig(rows=phase.rows, seed=self.seed, min_bucket=phase.min_bucket),
            optimizer=OptimizerConfig(learning_rate=phase.learning_rate, warmup_steps=phase.warmup_steps,
                                      end_lr_ratio=0.1, weight_decay=0.01),
            epochs=phase.epochs, checkpoint_every=50, log_every=10, progress_bar=False)


def corpus_texts(trajectories: Iterable[Trajectory]) -> list[str]:
    """Every text the organism reads or writes: the trajectories with their experience blocks, the
    lessons, and the agent's fixed prompts (nudges, errors, the forced answer)."""
    texts = [prompts.DEFAULT_INSTRUCTIONS, prompts.NO_ACTION_NUDGE, prompts.FORCED_ANSWER, STEPWISE_SYSTEM_NOTE,
             STEP_HEADER, format_global_block({"G0": "x"}), *(lesson.text for lesson in PRINCIPLE_LESSONS)]
    for t in trajectories:
        texts.extend(m.content for m in t.messages)
        texts.append(t.global_injection)
        texts.extend(t.step_injections)
    return texts


def _without_system(trajectory: Trajectory) -> Trajectory:
    return dataclasses.replace(trajectory, messages=tuple(m for m in trajectory.messages if m.role != "system"))


def organism_model_config(vocab: SubVocabulary, tokenizer, shape: OrganismShape) -> Qwen3Config:
    return Qwen3Config(vocab_size=vocab.padded_size, tie_word_embeddings=True, max_position_embeddings=8192,
                       bos_token_id=None, eos_token_id=tokenizer.eos_token_id, **dataclasses.asdict(shape))


def bootstrap(config: OrganismConfig, out: str | Path, *, command: Sequence[str] = (),
              init: str | Path | None = None, new_vocabulary: bool = False) -> Path:
    """Builds π_0 into ``out`` (see the module docstring); returns ``out``.

    ``init``: another organism's directory to continue from instead of a fresh network: its weights
    and its sub-vocabulary (texts it lacks tokens for are split into smaller kept pieces), so a
    finished phase can be followed by more without repeating it. ``config.shape`` must be the
    init's; its record is kept whole under ``init`` in the new one. ``new_vocabulary`` (with
    ``init``): the sub-vocabulary is built afresh from this run's texts (``vocab_tokens``,
    ``vocab_min_count``) and the init's embedding rows are carried over for the tokens both keep;
    the others start from the fresh network's rows."""
    out = Path(out)
    work = out.with_name(out.name + ".train")
    started = time.time()
    drilled = drills(config.drills) if config.drill.epochs else []
    plain = [_without_system(t) for t in bootstrap_trajectories(config.lm_corpus)] if config.lm.epochs else []
    trajectories = bootstrap_trajectories(config.corpus)
    base = load_tokenizer(None)
    if new_vocabulary and init is None:
        raise ValueError("bootstrap: new_vocabulary carries an init's rows over; it needs init")
    started_from = None
    if init is None or new_vocabulary:
        vocab = SubVocabulary.from_corpus(base, corpus_texts([*drilled, *plain, *trajectories]),
                                          max_tokens=config.vocab_tokens, min_count=config.vocab_min_count)
        model = init_model(organism_model_config(vocab, vocab.tokenizer(base), config.shape),
                           init_std=config.init_std, seed=config.seed)
    if init is not None:
        record = read_record(init)
        if record["config"]["shape"] != dataclasses.asdict(config.shape):
            raise ValueError(f"bootstrap: the organism at {init} has the shape {record['config']['shape']}, not this "
                             f"configuration's {dataclasses.asdict(config.shape)}")
        started_from = {"checkpoint": str(init), "record": record, "new_vocabulary": new_vocabulary}
        trained = load_checkpoint(init)
        if new_vocabulary:
            _carry_weights(trained, SubVocabulary.load(init), model, vocab)
        else:
            vocab, model = SubVocabulary.load(init), trained
    tokenizer = vocab.tokenizer(base)
    chat = ChatFormat(tokenizer)
    phases = {}
    for name, phase, records, targets, view in (("drill", config.drill, drilled, "assistant", "plain"),
                                                 ("lm", config.lm, plain, "all", "plain"),
                                                 ("sft", config.sft, trajectories, "assistant", "teacher")):
        if not phase.epochs:
            continue
        examples = build_examples(((f"bootstrap {name}:{i}", t) for i, t in enumerate(records)), chat, config.budget,
                                  targets=targets)
        if not len(examples):
            raise ValueError(f"the bootstrap's {name} corpus gave no training example")
        result = train(config.trainer(phase, view), model, None, examples, None, output_dir=work / name)
        phases[name] = {"examples": examples.counts.to_json(), "steps": result.steps,
                        "final_train_metrics": dict(result.train_metrics)}
    save_checkpoint(model, out, tokenizer=tokenizer)
    vocab.save(out)
    storage.write_json(out / RECORD_FILE, {
        "what": "SimWeb model organism pi_0 (expint_jax.organism.bootstrap)",
        "command": list(command),
        "init": started_from,
        "config": dataclasses.asdict(config),
        "trajectories": {"drill": len(drilled), "lm": len(plain), "sft": len(trajectories)},
        "vocabulary": {"tokens": len(vocab), "padded_size": vocab.padded_size},
        "parameters": sum(int(x.size) for x in _leaves(model)),
        "phases": phases,
        "wall_seconds": round(time.time() - started, 1),
    })
    shutil.rmtree(work, ignore_errors=True)
    return out


def _carry_weights(source, source_vocab: SubVocabulary, target, target_vocab: SubVocabulary) -> None:
    """``source``'s weights into ``target`` (same shape but the vocabulary): every parameter, and
    the (tied) embedding rows of the tokens both vocabularies keep."""
    import numpy as np
    from flax import nnx

    trained, fresh = nnx.state(source, nnx.Param), nnx.state(target, nnx.Param)
    fresh["embed"][...] = target_vocab.carry_rows(np.asarray(trained["embed"][...]), source_vocab,
                                                 np.asarray(fresh["embed"][...]))
    for name in trained:
        if name != "embed":
            fresh[name] = trained[name]
    nnx.update(target, fresh)


def _leaves(model):
    import jax
    from flax import nnx

    return jax.tree.leaves(nnx.state(model, nnx.Param))
