"""The loop's wiring of three fidelity rules (issue 12), beyond the library functions' own tests:

  * item 10, task overlap: ``driver.check_task_split`` runs at start-up, so a run whose held-out
    world shares tasks with its training world stops with one line naming the keys before anything
    is written, while extraction and teacher tasks may coincide (the default);
  * item 8, student targets: the data stage scrubs the teacher's citations of E_k from the data it
    accepts and reports the counts (``distill.scrub_experience_refs``, default on; off keeps them);
  * item 4, sampling: the paper configs state the release's agent and experience-LLM sampling
    themselves, and the loop hands those values to the agent and to the writer's requests.

Acting is SimWeb's scripted reference policy (the data stage's, wrapped to cite the items it is
shown) or nothing at all; each test takes seconds.
"""

import dataclasses
import json
import re
from pathlib import Path

import pytest

import expint_jax.config
from expint_jax.cli import run as run_command
from expint_jax.config import bind, load_config_file
from expint_jax.experience.bank import ExperiencePool
from expint_jax.experience.inject import STEP_HEADER
from expint_jax.experience.scrub import ReferenceFinder
from expint_jax.loop import acting, driver, stages
from expint_jax.loop.config import LoopConfig
from expint_jax.loop.layout import StageDir, StageId
from expint_jax.records import Message, SamplingParams, Trajectory, read_trajectories
from tests.experience.fake_extractor import extractor_llm
from tests.fakes.http_server import ScriptedServer
from tests.loop.conftest import TINY, loop_config

# ------------------------------------------------------------------ item 10: the task split at start-up

WEB_KEYS = {"SERPER_API_KEY": "serper-test-key", "JINA_API_KEY": "jina-test-key"}


def _qa_lines(first: int, count: int) -> list[str]:
    return [json.dumps({"question": f"What is fact {i} on the site?", "answer": f"answer {i}",
                        "root_url": "https://site.example/", "info": {"difficulty_level": "easy"}}) + "\n"
            for i in range(first, first + count)]


@pytest.fixture
def web_keys(monkeypatch):
    for name, value in WEB_KEYS.items():
        monkeypatch.setenv(name, value)


def _web_flags(tmp_path: Path, train: Path, evaluation: Path) -> list[str]:
    # Tools on a closed local port: the run must stop before any rollout reaches for them.
    return [f"--config={TINY}", f"--config.runs_dir={tmp_path / 'runs'}", "--config.env=webwalker",
            f"--config.webwalker.train_file={train}", f"--config.webwalker.eval_file={evaluation}",
            "--config.webwalker.search_base_url=http://127.0.0.1:9",
            "--config.webwalker.visit_base_url=http://127.0.0.1:9", "--config.extract.writer=self"]


@pytest.mark.parametrize("shared", [6, 1], ids=["eval_file_is_train_file", "one_shared_question"])
def test_held_out_tasks_overlapping_the_training_tasks_are_refused_at_start_up(tmp_path, capsys, monkeypatch,
                                                                               web_keys, shared):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(_qa_lines(0, 6)))
    evaluation = train if shared == 6 else tmp_path / "eval.jsonl"
    if shared == 1:  # a held-out file holding one question of the training file
        evaluation.write_text("".join(_qa_lines(100, 3) + _qa_lines(4, 1)))

    def stage_ran(run, k, work):
        raise AssertionError(f"{work.name} ran: the task split was not checked at start-up")

    for name in stages.STAGES:
        monkeypatch.setitem(driver.STAGE_FUNCTIONS, name, stage_ran)
    code = run_command.main(_web_flags(tmp_path, train, evaluation))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("expint run: ") and len(err.splitlines()) == 1, err
    for key in ("config.webwalker.train_file", "config.webwalker.eval_file", "config.eval.tasks",
                "config.distill.heldout_tasks", "config.extract.tasks", "config.distill.tasks"):
        assert key in err
    assert f"evaluation and extraction tasks share {shared} ids" in err
    assert "evaluation and teacher tasks share" in err
    assert not (tmp_path / "runs").exists()  # refused before anything was written


@pytest.mark.parametrize("granularity", ["principle", "instance"])
def test_extraction_and_teacher_tasks_may_coincide(tmp_path, web_keys, granularity):
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(_qa_lines(0, 6)))
    evaluation.write_text("".join(_qa_lines(100, 3)))
    config = loop_config(tmp_path / "runs", env="webwalker", webwalker__train_file=str(train),
                         webwalker__eval_file=str(evaluation), extract__writer="self",
                         extract__granularity=granularity)
    run = driver.open_run(config)
    # The defaults (extract.tasks = distill.tasks = 0) give both stages all six training tasks.
    extraction, teacher = ({t.task_id for t in acting.pick(run.worlds.train.tasks(), n)}
                           for n in (config.extract.tasks, config.distill.tasks))
    assert extraction == teacher and len(teacher) == 6
    driver.plan(run, driver.schedule(config.iterations))  # the start-up checks pass
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ item 8: the data stage scrubs citations

CITATION = "Following {}, I keep to the plan that worked before.\n"
_CITED = re.compile(re.escape(CITATION).replace(r"\{\}", r"G\d+"))
_VISIBLE = re.compile(r"As G\d+ says, (?=<answer>)")
_ITEM_ID = re.compile(r"^(G\d+): ", re.MULTILINE)


def _uncited(text: str) -> str:
    return _VISIBLE.sub("", _CITED.sub("", text))


class CitingPolicy:
    """The reference policy as a teacher that cites what it is shown: in every turn whose request
    carries a step-wise block, its thought opens with a sentence naming the block's first item; on
    the task asking ``visible_in``, its answer cites the item outside the thought too. (The
    reference policy replays its own earlier turns, so it is shown them without the citations.)"""

    def __init__(self, inner, visible_in: str):
        self.inner, self.visible_in = inner, visible_in

    def chat(self, conversations, params):
        as_written = [[dataclasses.replace(m, content=_uncited(m.content)) if m.role == "assistant" else m
                       for m in messages] for messages in conversations]
        replies = self.inner.chat(as_written, params)
        cited = []
        for messages, reply in zip(conversations, replies, strict=True):
            last = messages[-1].content
            if STEP_HEADER in last:
                item = _ITEM_ID.findall(last.split(STEP_HEADER, 1)[1])[0]
                text = reply.text.replace("<think>\n", "<think>\n" + CITATION.format(item), 1)
                if self.visible_in in messages[1].content:
                    text = text.replace("<answer>", f"As {item} says, <answer>", 1)
                reply = dataclasses.replace(reply, text=text)
            cited.append(reply)
        return cited


def _citing_backend(visible_in: str):
    original = acting.acting_backend

    def backend(config, model, tokenizer, mesh):
        return CitingPolicy(original(config, model, tokenizer, mesh), visible_in)

    return backend


@pytest.fixture(scope="module")
def citing_data(tmp_path_factory):
    """The reference loop's rollouts and extraction, then its data stage twice with a citing
    teacher: scrubbing on (the default), then off (restarted from the data stage)."""
    runs = tmp_path_factory.mktemp("runs")
    overrides = dict(policy__backend="reference", distill__samples=4, distill__heldout_tasks=0)
    on = loop_config(runs, **overrides)
    run_dir = runs / "loop_tiny"
    visible = acting.pick(acting.Worlds.of(on).train.tasks(), on.distill.tasks)[0]
    data = StageId(0, "data")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(acting, "acting_backend", _citing_backend(visible.question))
        # The reference policy acts whatever the weights: skip building the tiny network for it.
        patch.setattr(stages.Run, "load_policy", lambda self, k, **kw: None)
        run = driver.open_run(on)
        driver.run_loop(on, only=[StageId(0, "rollouts"), StageId(0, "extract"), data], echo=lambda line: None, run=run)
        result = {"on": _read_data(run_dir)}
        off = loop_config(runs, **overrides, distill__scrub_experience_refs=False)
        driver.run_loop(off, only=[data], restart_from="iter_000/data", echo=lambda line: None,
                        run=dataclasses.replace(run, config=off, stage_hashes={}))
        result["off"] = _read_data(run_dir)
    finder = ReferenceFinder(stages.read_pool(run_dir / "iter_000" / "extract" / "pool.jsonl").as_mapping())
    return finder, visible.task_id, result


def _read_data(run_dir: Path) -> dict:
    folder = run_dir / "iter_000" / "data"
    return {"summary": StageDir(run_dir, StageId(0, "data")).marker()["summary"],
            "accepted": read_trajectories(folder / "accepted.jsonl"),
            "acceptance": json.loads((folder / "acceptance.json").read_text())}


def _assistant(trajectory: Trajectory) -> list[str]:
    return [m.content for m in trajectory.messages if m.role == "assistant"]


def test_scrubbing_off_keeps_the_teachers_citations(citing_data):
    finder, _, data = citing_data
    accepted, summary = data["off"]["accepted"], data["off"]["summary"]
    assert accepted and all(any(map(finder.refers, _assistant(t))) for t in accepted)
    assert not any("scrubbed_experience_refs" in t.metadata for t in accepted)
    assert "scrubbed" not in summary and summary["accepted"] == len(accepted)


def test_the_data_stage_scrubs_teacher_citations_of_the_pool_and_reports_the_counts(citing_data):
    finder, visible_id, data = citing_data
    cited, scrubbed = data["off"]["accepted"], data["on"]["accepted"]  # the same teacher rollouts (same seeds)
    assert data["on"]["summary"]["teacher_rollouts"] == data["off"]["summary"]["teacher_rollouts"]
    # With scrubbing on, nothing accepted cites the pool.
    assert scrubbed and not any(finder.refers(text) for t in scrubbed for text in _assistant(t))
    dropped = [t for t in cited if t.task_id == visible_id]  # cited in the visible answer: cannot be cut
    kept = [t for t in cited if t.task_id != visible_id]
    assert dropped and kept
    # Scrubbing cut exactly the citing sentences, and recorded how many per trajectory.
    assert [[_CITED.sub("", text) for text in _assistant(t)] for t in kept] == [_assistant(t) for t in scrubbed]
    cited_turns = sum(bool(_CITED.search(text)) for t in kept for text in _assistant(t))
    assert [t.metadata["scrubbed_experience_refs"] for t in scrubbed] == [
        sum(bool(_CITED.search(text)) for text in _assistant(t)) for t in kept]
    summary = data["on"]["summary"]
    assert summary["scrubbed"] == {"trajectories": len(cited), "rewritten_turns": cited_turns,
                                   "removed_sentences": cited_turns, "dropped": len(dropped)}
    assert summary["accepted"] == len(scrubbed) == len(cited) - len(dropped)
    # The judge's acceptance is that of the teacher's rollouts, before scrubbing.
    assert data["on"]["acceptance"] == data["off"]["acceptance"] and data["on"]["acceptance"]["accepted"] == len(cited)



# ------------------------------------------------------------------ item 4: sampling of the paper configs

PAPER = Path(__file__).resolve().parents[2] / "configs" / "paper"
AGENT = {"temperature": 0.7, "top_p": 0.95, "presence_penalty": 1.1}
WRITER = {"temperature": 0.0, "max_tokens": 8192}


def _paper(name: str) -> LoopConfig:
    return bind(LoopConfig, load_config_file(PAPER / name, "v5p-8"))


@pytest.mark.parametrize("name", sorted(p.name for p in PAPER.glob("qwen3_*.py")))
def test_the_paper_configs_set_the_release_sampling_themselves(name, monkeypatch):
    defaults = expint_jax.config.config_dict

    def other_defaults(schema, **kw):  # a schema whose sampling defaults changed
        c = defaults(schema, **kw)
        c.agent.update(temperature=1.0, top_p=1.0, presence_penalty=0.0)
        c.extract.update(temperature=0.7, max_tokens=2048)
        return c

    for config_dict in (defaults, other_defaults):
        monkeypatch.setattr(expint_jax.config, "config_dict", config_dict)  # what the config files import
        config = _paper(name)
        assert {key: getattr(config.agent, key) for key in AGENT} == AGENT, config_dict.__name__
        assert {key: getattr(config.extract, key) for key in WRITER} == WRITER, config_dict.__name__


def test_the_loop_hands_the_paper_sampling_to_the_agent():
    config = _paper("qwen3_4b.py")
    assert acting.agent_config(config).sampling == SamplingParams(**AGENT, max_tokens=config.agent.max_tokens)


def _rollout(task: str, reward: float) -> Trajectory:
    question = "Which year was the society on the site founded?"
    answer = "1923" if reward else "1950"
    return Trajectory(task, (Message("system", "You are a research agent."), Message("user", question),
                             Message("assistant", f"<think>\nI know it.\n</think>\n\n<answer>{answer}</answer>")),
                      prediction=answer, reward=reward, ground_truth="1923")


def test_the_writer_requests_carry_the_paper_sampling(tmp_path, monkeypatch):
    config = _paper("qwen3_4b.py")
    monkeypatch.setenv(config.extract.endpoint.api_key_env, "writer-test-key")
    with ScriptedServer(extractor_llm()) as server:
        endpoint = dataclasses.replace(config.extract.endpoint, base_url=server.url + "/v1", max_attempts=1)
        config = dataclasses.replace(config, extract=dataclasses.replace(config.extract, endpoint=endpoint),
                                     progress_bar=False)
        run = stages.Run(config, tmp_path, None, None, None, None)
        # The extract stage's writer, whichever schedule (the paper's release_steps calls it per step).
        pool, facts = stages.write_experience(run, 0, [_rollout("t0", 1.0), _rollout("t0", 0.0)], ExperiencePool(),
                                              tmp_path / "w")
    assert facts["informative_groups"] == 1 and len(pool) > 0  # every pipeline stage was asked
    bodies = [json.loads(r.body) for r in server.requests if r.path == "/v1/chat/completions"]
    assert bodies and all({key: body.get(key) for key in WRITER} == WRITER for body in bodies)
