"""Bootstrap end to end at a micro size: trajectories -> sub-vocabulary -> training -> export -> the gate."""

import dataclasses

import numpy as np
import pytest

from expint_jax import storage
from expint_jax.llm.local import LocalEngine
from expint_jax.models.subvocab import SubVocabulary
from expint_jax.models.tokenizer import load_tokenizer
from expint_jax.organism import RECORD_FILE, check_unseen_world
from expint_jax.organism.bootstrap import NO_EXPERIENCE, OrganismConfig, OrganismShape, Phase, bootstrap
from expint_jax.organism.data import CorpusConfig
from expint_jax.organism.drills import DrillConfig
from expint_jax.organism.gate import format_result, run_gate
from expint_jax.records import SamplingParams
from expint_jax.rollout.agent import AgentConfig

MICRO = OrganismConfig(
    drills=DrillConfig(seeds=(301,), levels=("easy",), tasks_per_level=1, tasks_per_site=1, per_page=1),
    lm_corpus=CorpusConfig(seeds=(201,), levels=("easy",), tasks_per_level=2, samples=1, mix=NO_EXPERIENCE),
    corpus=CorpusConfig(seeds=(101,), levels=("easy",), tasks_per_level=3, samples=1),
    shape=OrganismShape(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16),
    vocab_tokens=1024, drill=Phase(epochs=1, learning_rate=1e-3, warmup_steps=0, rows=64, min_bucket=128),
    lm=Phase(epochs=1, learning_rate=1e-3, warmup_steps=0, rows=4),
    sft=Phase(epochs=1, learning_rate=1e-3, warmup_steps=0, rows=4))


@pytest.fixture(scope="module")
def organism(tmp_path_factory):
    return bootstrap(MICRO, tmp_path_factory.mktemp("organism") / "pi0", command=["test"])


def test_export_is_a_hugging_face_directory_with_its_sub_vocabulary(organism):
    record = storage.read_json(organism / RECORD_FILE)
    drilled = record["trajectories"].pop("drill")
    assert record["command"] == ["test"] and record["trajectories"] == {"lm": 2, "sft": 3}
    assert record["phases"]["drill"]["examples"]["kept"] == drilled > 0
    assert {name: phase["steps"] for name, phase in record["phases"].items()} == {
        "drill": -(-drilled // 64), "lm": 1, "sft": 1}
    assert record["phases"]["sft"]["examples"]["kept"] == 3 and record["phases"]["lm"]["examples"]["kept"] == 2
    assert record["config"]["shape"] == dataclasses.asdict(MICRO.shape)
    vocab = SubVocabulary.load(organism)
    tokenizer = load_tokenizer(organism)
    assert len(tokenizer) == len(vocab) == record["vocabulary"]["tokens"]
    assert storage.read_json(organism / "config.json")["vocab_size"] == vocab.padded_size
    assert not organism.with_name("pi0.train").exists()  # the trainer's work directory is removed


def test_the_gate_runs_the_network_in_every_injection(organism):
    engine = LocalEngine.from_checkpoint(organism, max_batch_size=8, max_context=2048)
    agent = AgentConfig(max_llm_calls=2, max_context_tokens=1800, sampling=SamplingParams(temperature=0.7, max_tokens=8))
    result = run_gate(engine, levels=("easy",), tasks=2, samples=2, agent=agent)
    assert [row.injection for row in result.rows] == ["none", "stepwise", "global", "stepwise_random"]
    assert result.tasks == 2 and result.samples == 2
    assert -1.0 <= result.difference <= 1.0
    assert "stepwise - none" in format_result(result, "pi0")


def test_a_loop_on_a_world_the_organism_trained_on_is_refused(organism):
    check_unseen_world(organism, 0)
    check_unseen_world(None, 101)  # not an organism: nothing to check
    for seed, section in ((101, "corpus"), (201, "lm_corpus"), (301, "drills")):
        with pytest.raises(ValueError, match=rf"seed {seed} is one of the worlds .* config\.{section}\.seeds"):
            check_unseen_world(organism, seed)


def test_the_probe_command_runs_the_network_on_an_unseen_world(organism, capsys):
    from expint_jax import cli

    assert cli.main(["organism", "probe", "--checkpoint", str(organism), "--count", "4", "--world-seed", "399"]) == 0
    out = capsys.readouterr().out
    assert "copy probe, greedy, exact replies" in out
    assert sum(int(line.split(": ")[1].split("/")[1]) for line in out.splitlines()
               if line.startswith(("  link:", "  fact:", "  repeat:"))) == 4
    assert cli.main(["organism", "probe", "--checkpoint", str(organism), "--layout", "agent", "--count", "2",
                     "--world-seed", "399"]) == 0
    out = capsys.readouterr().out
    assert "  search: " in out and "  real page: " in out
    assert cli.main(["organism", "probe", "--checkpoint", str(organism), "--world-seed", "301"]) == 2  # trained on it


def test_a_warm_start_continues_from_another_organism(organism, tmp_path):
    later = dataclasses.replace(MICRO, drills=dataclasses.replace(MICRO.drills, seeds=(302,), fact_share=1.0),
                                lm=dataclasses.replace(MICRO.lm, epochs=0), corpus=dataclasses.replace(
                                    MICRO.corpus, seeds=(102,)))
    pi = bootstrap(later, tmp_path / "pi1", command=["later"], init=organism)
    record = storage.read_json(pi / RECORD_FILE)
    assert record["init"] == {"checkpoint": str(organism), "record": storage.read_json(organism / RECORD_FILE),
                              "new_vocabulary": False}
    assert SubVocabulary.load(pi) == SubVocabulary.load(organism)  # the init's numbering, not a new one
    assert set(record["phases"]) == {"drill", "sft"}
    before, after = (LocalEngine.from_checkpoint(p, max_batch_size=2, max_context=256).model for p in (organism, pi))
    assert not np.allclose(before.embed[...], after.embed[...])  # it trained
    for seed in (301, 101, 201, 302, 102):  # its own worlds and the init's
        with pytest.raises(ValueError, match=rf"seed {seed} is one of the worlds"):
            check_unseen_world(pi, seed)
    with pytest.raises(ValueError, match="has the shape"):
        bootstrap(dataclasses.replace(later, shape=dataclasses.replace(MICRO.shape, hidden_size=64)),
                  tmp_path / "pi2", init=organism)
    with pytest.raises(ValueError, match="is not a SimWeb organism"):
        bootstrap(later, tmp_path / "pi3", init=tmp_path)


def test_a_warm_start_with_a_new_vocabulary_carries_the_rows_of_the_tokens_both_keep(organism, tmp_path):
    untrained = dataclasses.replace(MICRO, drill=dataclasses.replace(MICRO.drill, epochs=0),
                                    lm=dataclasses.replace(MICRO.lm, epochs=0), sft=dataclasses.replace(MICRO.sft, epochs=0),
                                    corpus=dataclasses.replace(MICRO.corpus, seeds=(102,)), vocab_min_count=3)
    pi = bootstrap(untrained, tmp_path / "pi1", init=organism, new_vocabulary=True)
    old, new = SubVocabulary.load(organism), SubVocabulary.load(pi)
    assert storage.read_json(pi / RECORD_FILE)["init"]["new_vocabulary"] is True
    assert new != old and len(new) < len(old)  # rare tokens of the corpus left out
    before, after = (LocalEngine.from_checkpoint(p, max_batch_size=2, max_context=256).model for p in (organism, pi))
    shared = sorted(set(old.base_ids) & set(new.base_ids))
    np.testing.assert_array_equal(np.asarray(after.embed[...])[new.from_base(shared)],
                                  np.asarray(before.embed[...])[old.from_base(shared)])
    np.testing.assert_array_equal(np.asarray(after.final_norm[...]), np.asarray(before.final_norm[...]))
    with pytest.raises(ValueError, match="needs init"):
        bootstrap(untrained, tmp_path / "pi2", new_vocabulary=True)


def test_the_bootstrap_command_refuses_a_new_vocabulary_without_an_init(tmp_path, capsys):
    from expint_jax import cli

    assert cli.main(["organism", "bootstrap", "--out", str(tmp_path / "pi"), "--new-vocabulary"]) == 2
    assert "--new-vocabulary needs --init" in capsys.readouterr().err
    assert not (tmp_path / "pi").exists()


def test_short_urls_are_recorded_inherited_and_required_of_a_loop(organism, tmp_path, monkeypatch):
    from expint_jax import cli
    from expint_jax.config import ConfigError
    from expint_jax.organism import check_url_style, url_style

    quick = ["--tasks-per-level", "2", "--samples", "1", "--drill-epochs", "0", "--lm-epochs", "0", "--epochs", "0"]
    assert cli.main(["organism", "bootstrap", "--init", str(organism), "--out", str(tmp_path / "short"),
                     "--seeds", "103", "--url-style", "short", *quick]) == 0
    assert url_style(organism) == url_style(None) == "path" and url_style(tmp_path / "short") == "short"
    record = storage.read_json(tmp_path / "short" / RECORD_FILE)
    assert {record["config"][s]["url_style"] for s in ("drills", "lm_corpus", "corpus")} == {"short"}
    # A later warm start keeps the init's URLs unless told otherwise.
    assert cli.main(["organism", "bootstrap", "--init", str(tmp_path / "short"), "--out", str(tmp_path / "later"),
                     "--seeds", "104", *quick]) == 0
    assert url_style(tmp_path / "later") == "short"
    check_url_style(tmp_path / "later", "short")
    check_url_style(None, "path")
    with pytest.raises(ConfigError, match="url_style='short'.*not 'path'; set simweb.url_style"):
        check_url_style(tmp_path / "later", "path")
    from expint_jax.config import bind, config_dict
    from expint_jax.loop import acting
    from expint_jax.loop.config import LoopConfig

    loop = config_dict(LoopConfig, name="short")
    loop.model.checkpoint = str(tmp_path / "later")
    with pytest.raises(ConfigError, match="set simweb.url_style to match"):
        acting.Worlds.of(bind(LoopConfig, loop))
    loop.simweb.url_style = "short"
    assert acting.Worlds.of(bind(LoopConfig, loop)).train.tasks()[0].metadata["root_url"].startswith("https://s")
    # The gate builds its held-out worlds with the organism's URLs.
    from expint_jax.organism import gate

    seen = []
    monkeypatch.setattr(gate, "run_gate", lambda engine, **kw: seen.append(kw["url_style"]) or gate.GateResult(
        (), float("nan"), float("nan"), 0, 1))
    for pi in (organism, tmp_path / "later"):
        assert cli.main(["organism", "gate", "--checkpoint", str(pi), "--tasks", "1"]) == 0
    assert seen == ["path", "short"]
