"""π_0 of the SimWeb model organism: a small Qwen3 trained from scratch on the scripted agent's trajectories.

``bootstrap(config, out)`` (``expint organism bootstrap --out DIR``) does:
  1. the bootstrap trajectories (``organism.data``: the experience-sensitive scripted agent under
     a mix of contexts, on SimWeb worlds disjoint from the loop's);
  2. a sub-vocabulary of the Qwen3 tokenizer (``models.subvocab``) from those trajectories, the
     lessons, the experience blocks and the agent's fixed texts, so the output layer has ~8K
     rows instead of 151,936 while the tokenization of SimWeb text stays Qwen3's;
  3. a Qwen3 of ``OrganismConfig.shape`` (tied embeddings) initialised from ``seed`` and trained by
     the distillation trainer with the ``nll`` loss on the *teacher's* layout
     (``StepConfig(student_view="teacher")``): every assistant turn is learned with exactly the
     experience that turn saw in context (global block, or its own step-wise block);
  4. the Hugging Face directory ``DIR/`` (``model.safetensors``, ``config.json``, tokenizer files,
     ``subvocab.json``) and ``DIR/organism.json``: the configuration, the seed, the command, the
     data counts and the final training loss. The trainer's work directory (``DIR.train/``) holds
     checkpoints, so a killed bootstrap resumes; it is removed once the export is written.

Everything is seeded: the same configuration gives the same trajectories, vocabulary and initial
weights (training is deterministic on one machine, up to XLA's CPU reductions across machines).
"""

from __future__ import annotations

import dataclasses
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
from expint_jax.models.hf import save_checkpoint
from expint_jax.models.init import init_model
from expint_jax.models.subvocab import SubVocabulary
from expint_jax.models.tokenizer import load_tokenizer
from expint_jax.organism.data import CorpusConfig, bootstrap_trajectories
from expint_jax.records import Trajectory
from expint_jax.rollout import prompts
from expint_jax.rollout.envs.simweb.lessons import PRINCIPLE_LESSONS

RECORD_FILE = "organism.json"


@dataclasses.dataclass(frozen=True)
class OrganismShape:
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32


@dataclasses.dataclass(frozen=True)
class OrganismConfig:
    corpus: CorpusConfig = CorpusConfig()
    shape: OrganismShape = OrganismShape()
    vocab_tokens: int = 8192  # corpus tokens kept before the merge-path closure and the added tokens
    seed: int = 0
    init_std: float = 0.02
    epochs: int = 4
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    rows: int = 8
    budget: ViewBudget = ViewBudget(max_student_tokens=4096, max_teacher_tokens=8192)

    def trainer(self) -> TrainerConfig:
        return TrainerConfig(
            step=StepConfig(Divergence("nll"), chunk_size=512, student_view="teacher"),
            batching=BatchingConfig(rows=self.rows, seed=self.seed, min_bucket=256),
            optimizer=OptimizerConfig(learning_rate=self.learning_rate, warmup_steps=self.warmup_steps,
                                      end_lr_ratio=0.1, weight_decay=0.01),
            epochs=self.epochs, checkpoint_every=50, log_every=10, progress_bar=False)


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


def organism_model_config(vocab: SubVocabulary, tokenizer, shape: OrganismShape) -> Qwen3Config:
    return Qwen3Config(vocab_size=vocab.padded_size, tie_word_embeddings=True, max_position_embeddings=8192,
                       bos_token_id=None, eos_token_id=tokenizer.eos_token_id, **dataclasses.asdict(shape))


def bootstrap(config: OrganismConfig, out: str | Path, *, command: Sequence[str] = ()) -> Path:
    """Builds π_0 into ``out`` (see the module docstring); returns ``out``."""
    out = Path(out)
    work = out.with_name(out.name + ".train")
    started = time.time()
    trajectories = bootstrap_trajectories(config.corpus)
    base = load_tokenizer(None)
    vocab = SubVocabulary.from_corpus(base, corpus_texts(trajectories), max_tokens=config.vocab_tokens)
    tokenizer = vocab.tokenizer(base)
    examples = build_examples(((f"bootstrap:{i}", t) for i, t in enumerate(trajectories)), ChatFormat(tokenizer),
                              config.budget)
    if not len(examples):
        raise ValueError("the bootstrap corpus gave no training example")
    model = init_model(organism_model_config(vocab, tokenizer, config.shape), init_std=config.init_std,
                       seed=config.seed)
    result = train(config.trainer(), model, None, examples, None, output_dir=work)
    save_checkpoint(model, out, tokenizer=tokenizer)
    vocab.save(out)
    storage.write_json(out / RECORD_FILE, {
        "what": "SimWeb model organism pi_0 (expint_jax.organism.bootstrap)",
        "command": list(command),
        "config": dataclasses.asdict(config),
        "trajectories": len(trajectories),
        "examples": examples.counts.to_json(),
        "vocabulary": {"tokens": len(vocab), "padded_size": vocab.padded_size},
        "parameters": sum(int(x.size) for x in _leaves(model)),
        "steps": result.steps,
        "final_train_metrics": dict(result.train_metrics),
        "wall_seconds": round(time.time() - started, 1),
    })
    shutil.rmtree(work, ignore_errors=True)
    return out


def _leaves(model):
    import jax
    from flax import nnx

    return jax.tree.leaves(nnx.state(model, nnx.Param))
