"""The SimWeb model organism: a small Qwen3, trained from scratch, that acts on SimWeb and uses experience.

Nobody can run the paper's loop on a laptop with a 4B model. The organism is a network small enough
to roll out thousands of times on two CPU cores whose behaviour still depends on the lessons in its
context, so the loop's mechanisms (extraction, step-wise vs global injection, off- vs on-policy
internalization) act on something real.

  * ``drills``: copy drills (a page and one request: open a link, read a fact) that teach the
    small network to copy from its context before it learns the agent's trajectories.
  * ``data``: the bootstrap trajectories: SimWeb's experience-sensitive scripted agent under a mix
    of contexts (none, global, step-wise, random and instance lessons), on worlds disjoint from
    the loop's.
  * ``bootstrap``: π_0 = a Qwen3 on a SimWeb sub-vocabulary, trained from scratch by the
    distillation trainer (``nll`` on the experience-conditioned view), exported as a Hugging Face
    directory with its tokenizer and a record of how it was made.
  * ``gate``: the network (not the script) with and without experience in context on held-out
    tasks, with confidence intervals.

What is designed in and what is learned: the scripted agent's response to lessons is designed
(``rollout/envs/simweb/sensitivity.py``); the network only imitates trajectories. Whether the
network's behaviour depends on its context, and how internalization changes it, is measured.
"""

import json
from pathlib import Path

from expint_jax.config import ConfigError

SHIPPED = Path(__file__).with_name("pi0")
RECORD_FILE = "organism.json"  # beside the exported checkpoint: how it was made
TRAINING_WORLDS = ("drills", "lm_corpus", "corpus")  # the record's config sections that name SimWeb seeds


def shipped_checkpoint() -> Path:
    """Where the repository's π_0 lives (``expint organism bootstrap --out`` that path rebuilds it;
    its ``organism.json`` records the command and seed that made it)."""
    return SHIPPED


def check_unseen_world(checkpoint: str | Path | None, seed: int) -> None:
    """Refuses to evaluate an organism on a SimWeb world it was trained on.

    No-op unless ``checkpoint`` holds an organism record; otherwise ``seed`` must not be among the
    seeds of its drills or corpora (held-out accuracy on seen sites measures memory, not skill)."""
    if not checkpoint or not (Path(checkpoint) / RECORD_FILE).exists():
        return
    record, where = read_record(checkpoint), RECORD_FILE
    while record:  # a warm-started organism also trained on the worlds of the one it started from
        for section in TRAINING_WORLDS:
            if seed in record["config"].get(section, {}).get("seeds", ()):
                raise ConfigError(f"SimWeb seed {seed} is one of the worlds that the organism at {checkpoint} trained "
                                 f"on ({where}: config.{section}.seeds); evaluate it on another seed")
        record, where = (record.get("init") or {}).get("record"), f"{where}: init.record"


def url_style(checkpoint: str | Path | None) -> str:
    """The SimWeb URL style (``SimWebConfig.url_style``) the organism at ``checkpoint`` acts on:
    the one its last phase b trained on; ``"path"`` (SimWeb's default) for a checkpoint without an
    organism record or a record made before the option."""
    if not checkpoint or not (Path(checkpoint) / RECORD_FILE).exists():
        return "path"
    return read_record(checkpoint)["config"]["corpus"].get("url_style", "path")


def check_url_style(checkpoint: str | Path | None, style: str) -> None:
    """Refuses SimWeb worlds whose URLs are not spelled as the organism at ``checkpoint`` learned
    to copy them (no-op unless ``checkpoint`` holds an organism record)."""
    if not checkpoint or not (Path(checkpoint) / RECORD_FILE).exists():
        return
    learned = url_style(checkpoint)
    if learned != style:
        raise ConfigError(f"the organism at {checkpoint} acts on SimWeb worlds with url_style={learned!r} "
                          f"({RECORD_FILE}: config.corpus.url_style), not {style!r}; set simweb.url_style to match")


def read_record(checkpoint: str | Path) -> dict:
    """The organism record beside a checkpoint; a clear error where there is none."""
    path = Path(checkpoint) / RECORD_FILE
    if not path.is_file():
        raise ConfigError(f"{checkpoint} is not a SimWeb organism: it has no {RECORD_FILE}")
    return json.loads(path.read_text())
