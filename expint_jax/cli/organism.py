"""``expint organism bootstrap|gate|probe``: build the SimWeb model organism's π_0, and measure it.

  * ``expint organism bootstrap --out DIR [--drill-epochs N] [--lm-epochs N] [--epochs N] [--init DIR] ...``:
    ``organism.bootstrap`` (drills and trajectories, sub-vocabulary, up to three training phases
    from scratch or from another organism, export with ``organism.json``).
  * ``expint organism gate --checkpoint DIR [--tasks 100] [--samples 3] [--out FILE]``: the
    network with and without experience in context on held-out SimWeb tasks (``organism.gate``).
    The gate and the probe build their worlds with the URL style the organism trained on
    (``organism.url_style``; ``bootstrap --url-style``).
  * ``expint organism probe --checkpoint DIR [--count 64] [--layout drills|agent]``: whether the
    network copies links, facts and lines from its context at all (``organism.probe``), on drills
    of an unseen world, or in the agent's own layout (its next turn in the scripted agent's
    conversations on that world).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

from expint_jax import storage
from expint_jax.cli.errors import ArgumentParser


def main(argv: Sequence[str] | None = None) -> int:
    from expint_jax.organism.bootstrap import OrganismConfig
    from expint_jax.organism.gate import INJECTIONS
    from expint_jax.rollout.envs.simweb.tasks import URL_STYLES

    parser = ArgumentParser(prog="expint organism", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    boot = commands.add_parser("bootstrap", help="train π_0 from scratch on the scripted agent's trajectories")
    boot.add_argument("--out", required=True, help="the Hugging Face directory to write")
    default = OrganismConfig()
    boot.add_argument("--lm-seeds", type=int, nargs="+", default=list(default.lm_corpus.seeds),
                      help="SimWeb world seeds of phase a (language modelling, no experience; never the loop's)")
    boot.add_argument("--seeds", type=int, nargs="+", default=list(default.corpus.seeds),
                      help="SimWeb world seeds of phase b (the agent's turns under a mix of contexts)")
    boot.add_argument("--tasks-per-level", type=int, default=default.corpus.tasks_per_level)
    boot.add_argument("--samples", type=int, default=default.corpus.samples, help="phase b rollouts per task")
    boot.add_argument("--drill-epochs", type=int, default=default.drill.epochs, help="copy-drill epochs (0: skip)")
    boot.add_argument("--drill-seeds", type=int, nargs="+", default=list(default.drills.seeds),
                      help="SimWeb world seeds of the copy drills")
    boot.add_argument("--repeat-share", type=float, default=default.drills.repeat_share,
                      help="share of the copy drills that repeat link lines verbatim")
    boot.add_argument("--fact-share", type=float, default=default.drills.fact_share,
                      help="share of the copy drills on entity pages that ask for a fact's value")
    boot.add_argument("--search-share", type=float, default=default.drills.search_share,
                      help="share of the copy drills that open a page from search results")
    boot.add_argument("--drill-learning-rate", type=float, default=default.drill.learning_rate)
    boot.add_argument("--init", help="continue from this organism's weights and sub-vocabulary (its shape wins "
                                     "over --hidden/--layers) instead of a fresh network")
    boot.add_argument("--new-vocabulary", action="store_true",
                      help="with --init: build the sub-vocabulary afresh from this run's texts and carry the init's "
                           "embedding rows over for the tokens both keep")
    boot.add_argument("--vocab-tokens", type=int, default=default.vocab_tokens,
                      help="most corpus tokens the sub-vocabulary keeps (before its merge-path closure)")
    boot.add_argument("--vocab-min-count", type=int, default=default.vocab_min_count,
                      help="leave out tokens the corpus uses fewer times (their words split into kept pieces)")
    boot.add_argument("--url-style", choices=URL_STYLES,
                      help="SimWeb URLs of every training world: path (names) or short (https://s<site>.example.org/"
                           "<page>); default: the init's, else path. The gate and the probe use the checkpoint's")
    boot.add_argument("--lm-epochs", type=int, default=default.lm.epochs, help="phase a epochs (0: skip)")
    boot.add_argument("--lm-learning-rate", type=float, default=default.lm.learning_rate)
    boot.add_argument("--epochs", type=int, default=default.sft.epochs, help="phase b epochs")
    boot.add_argument("--learning-rate", type=float, default=default.sft.learning_rate)
    boot.add_argument("--rows", type=int, default=default.sft.rows, help="trajectories per batch of phases a and b")
    boot.add_argument("--hidden", type=int, default=default.shape.hidden_size)
    boot.add_argument("--layers", type=int, default=default.shape.num_layers)
    boot.add_argument("--seed", type=int, default=default.seed)
    gate = commands.add_parser("gate", help="accuracy with and without experience in context, on held-out tasks")
    gate.add_argument("--checkpoint", required=True, help="the organism's Hugging Face directory")
    gate.add_argument("--tasks", type=int, default=100)
    gate.add_argument("--samples", type=int, default=3)
    gate.add_argument("--k", type=int, default=4, help="experience items per step-wise turn")
    gate.add_argument("--seed", type=int, default=0, help="rollout seed")
    gate.add_argument("--world-seed", type=int, default=0, help="SimWeb seed of the held-out world (the loop's)")
    gate.add_argument("--levels", default="easy,medium")
    gate.add_argument("--injections", default=",".join(INJECTIONS))
    gate.add_argument("--batch", type=int, default=128, help="rows the local engine decodes together")
    gate.add_argument("--out", help="also write the figures as JSON here")
    probe = commands.add_parser("probe", help="can the network copy links, facts and lines from its context?")
    probe.add_argument("--checkpoint", required=True, help="the organism's Hugging Face directory")
    probe.add_argument("--world-seed", type=int, default=399, help="SimWeb seed of the probe's drills")
    probe.add_argument("--layout", choices=("drills", "agent"), default="drills",
                       help="drills: the copy drills; agent: the next turn of scripted conversations")
    probe.add_argument("--count", type=int, default=64, help="drills, or tasks of the agent layout")
    probe.add_argument("--repeat-share", type=float, default=0.3)
    probe.add_argument("--search-share", type=float, default=0.0)
    args = parser.parse_args(argv)
    if args.command == "bootstrap":
        from expint_jax.organism import RECORD_FILE, read_record, url_style
        from expint_jax.organism.bootstrap import OrganismShape, bootstrap

        shape = (OrganismShape(**read_record(args.init)["config"]["shape"]) if args.init else
                 dataclasses.replace(default.shape, hidden_size=args.hidden, num_layers=args.layers,
                                     intermediate_size=3 * args.hidden))
        urls = args.url_style or (url_style(args.init) if args.init else "path")
        config = dataclasses.replace(
            default,
            lm_corpus=dataclasses.replace(default.lm_corpus, seeds=tuple(args.lm_seeds),
                                          tasks_per_level=args.tasks_per_level, url_style=urls),
            corpus=dataclasses.replace(default.corpus, seeds=tuple(args.seeds), tasks_per_level=args.tasks_per_level,
                                       samples=args.samples, url_style=urls),
            shape=shape,
            drills=dataclasses.replace(default.drills, seeds=tuple(args.drill_seeds), repeat_share=args.repeat_share,
                                       fact_share=args.fact_share, search_share=args.search_share, url_style=urls),
            drill=dataclasses.replace(default.drill, epochs=args.drill_epochs, learning_rate=args.drill_learning_rate),
            lm=dataclasses.replace(default.lm, epochs=args.lm_epochs, learning_rate=args.lm_learning_rate,
                                   rows=args.rows),
            sft=dataclasses.replace(default.sft, epochs=args.epochs, learning_rate=args.learning_rate, rows=args.rows),
            vocab_tokens=args.vocab_tokens, vocab_min_count=args.vocab_min_count, seed=args.seed)
        if args.new_vocabulary and not args.init:
            parser.error("--new-vocabulary needs --init (a fresh network always builds its vocabulary)")
        path = bootstrap(config, args.out, command=["expint", "organism", *(sys.argv[2:] if argv is None else argv)],
                         init=args.init, new_vocabulary=args.new_vocabulary)
        record = storage.read_json(path / RECORD_FILE)
        steps = " + ".join(f"{phase['steps']} {name}" for name, phase in record["phases"].items())
        print(f"expint organism bootstrap: {path} ({record['parameters']:,} parameters, {steps} steps, "
              f"{record['wall_seconds']} s)")
        return 0
    from expint_jax.llm.local import LocalEngine
    from expint_jax.organism import check_unseen_world, url_style

    check_unseen_world(args.checkpoint, args.world_seed)
    urls = url_style(args.checkpoint)
    if args.command == "probe":
        from expint_jax.organism.drills import DrillConfig
        from expint_jax.organism.probe import (copy_probe, format_probe, format_turn_losses, scripted_conversations,
                                               turn_losses, turn_probe)
        from expint_jax.rollout.envs.simweb.env import SimWebConfig, SimWebEnv

        if args.layout == "agent":
            engine = LocalEngine.from_checkpoint(args.checkpoint, max_batch_size=64, max_context=4096)
            env = SimWebEnv(SimWebConfig(seed=args.world_seed, split="train", tasks_per_level=(args.count + 1) // 2,
                                         levels=("easy", "medium"), url_style=urls))
            conversations = scripted_conversations(env, args.count)
            print(format_turn_losses(turn_losses(engine.model, engine.chat_format, conversations)))
            result = turn_probe(engine, env, conversations)
        else:
            engine = LocalEngine.from_checkpoint(args.checkpoint, max_batch_size=32, max_context=2048)
            config = DrillConfig(seeds=(args.world_seed,), repeat_share=args.repeat_share,
                                 search_share=args.search_share, url_style=urls)
            result = copy_probe(engine, config, args.count)
        print(format_probe(result, args.checkpoint))
        return 0
    from expint_jax.organism.gate import format_result, run_gate

    engine = LocalEngine.from_checkpoint(args.checkpoint, max_batch_size=args.batch, max_context=4096)
    result = run_gate(engine, world_seed=args.world_seed, levels=tuple(args.levels.split(",")), tasks=args.tasks,
                      samples=args.samples, k=args.k, seed=args.seed, which=args.injections.split(","),
                      url_style=urls)
    print(format_result(result, args.checkpoint))
    if args.out:
        storage.write_json(args.out, result.to_json())
    return 0
