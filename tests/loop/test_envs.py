"""The loop's environments: ``config.env`` picks SimWeb, WebWalkerQA or math; every world offers the
stages' interface (tasks with levels, tools, score); ``check_config`` refuses a broken environment
with one line naming the key (and only the names of key variables); stage keys name the env by its
section, so a SimWeb key is what it was. WebWalkerQA runs against a scripted local server (Serper,
Jina and an OpenAI-compatible judge), never the network."""

import dataclasses
import json
from pathlib import Path

import pytest

from expint_jax.config import ConfigError, bind, config_dict
from expint_jax.loop import acting
from expint_jax.loop.config import LoopConfig, WebWalkerSection, check_config, required_env_vars
from expint_jax.loop.stages import Run, stage_key
from expint_jax.records import Completion
from expint_jax.rollout.envs.math import MathEnv
from expint_jax.rollout.envs.simweb import SimWebEnv
from expint_jax.rollout.envs.webwalker import WebQAEnv
from tests.fakes.http_server import Reply, Request, ScriptedServer
from tests.fakes.openai import chat_reply

SECRET = "value-that-must-never-be-printed"
KEYS = {"SERPER_API_KEY": SECRET, "JINA_API_KEY": SECRET}


def _line(i: int, level: str, site: str = "https://site.example/") -> dict:
    return {"question": f"What is fact {i} on the site?", "answer": f"answer {i}", "root_url": site,
            "info": {"difficulty_level": level, "type": "single_source", "lang": "en"}}


def _write(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture
def qa_files(tmp_path):
    train = _write(tmp_path / "train.jsonl", [_line(i, ("easy", "medium", "hard")[i % 3]) for i in range(9)])
    test = _write(tmp_path / "test.jsonl", [_line(100 + i, ("easy", "hard")[i % 2]) for i in range(4)])
    return train, test


def _config(**sections) -> LoopConfig:
    c = config_dict(LoopConfig, name="envs")
    for dotted, value in sections.items():
        node = c
        *parents, leaf = dotted.split("__")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return bind(LoopConfig, c)


def _key(config: LoopConfig, stage: str = "rollouts") -> dict:
    return stage_key(Run(config, Path("unused"), None, None, None, None), 0, stage)


# ------------------------------------------------------------------ SimWeb stays as it was


def test_simweb_is_the_default_and_its_stage_keys_are_unchanged():
    config = _config()
    worlds = acting.Worlds.of(config)
    assert config.env == "simweb" and isinstance(worlds.train, SimWebEnv) and isinstance(worlds.test, SimWebEnv)
    key = _key(config)
    assert {"model", "policy", "simweb", "agent", "seed", "batch_tasks"} <= set(key)
    assert not {"env", "webwalker", "math"} & set(key)
    # A setting of an unused environment never invalidates a SimWeb stage.
    assert _key(_config(math__seed=7, webwalker__include_root_url=True)) == key
    # The default URL style is not in the key (keys made before the option hold); short URLs are.
    assert "url_style" not in key["simweb"]
    short = _config(simweb__url_style="short")
    assert _key(short)["simweb"]["url_style"] == "short"
    assert acting.Worlds.of(short).test.tasks()[0].metadata["root_url"].startswith("https://s")


# ------------------------------------------------------------------ math


def test_math_worlds_are_two_seeded_splits_with_levels_and_the_python_tool():
    config = _config(env="math", math__train_tasks_per_level=2, math__eval_tasks_per_level=1,
                     math__levels=("easy", "hard"), extract__writer="self")
    check_config(config, environ={})
    worlds = acting.Worlds.of(config)
    assert isinstance(worlds.train, MathEnv) and isinstance(worlds.test, MathEnv)
    train, test = worlds.train.tasks(), worlds.test.tasks()
    assert len(train) == 4 and len(test) == 2
    assert not {t.task_id for t in train} & {t.task_id for t in test}
    assert [t.metadata["level"] for t in acting.pick(train, 0)] == ["easy", "hard", "easy", "hard"]
    assert [tool.spec.name for tool in worlds.train.tools(train[0])] == ["python"]
    task = train[0]
    assert worlds.train.score(task, f"<answer>{task.answer}</answer>") == 1.0
    assert worlds.train.score(task, "<answer>-1</answer>") == 0.0
    key = _key(config)
    assert "math" in key and "simweb" not in key
    assert _key(dataclasses.replace(config, math=dataclasses.replace(config.math, seed=1))) != key


@pytest.mark.parametrize("overrides, message", [
    ({"math__train_split": "test"}, "math.train_split and math.test_split must differ"),
    ({"math__levels": ("easy", "impossible")}, "math.levels"),
    ({"math__families": ("rates", "poetry")}, "math.families"),
])
def test_bad_math_sections_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(env="math", **overrides)


def test_math_refuses_simwebs_offline_writer_and_reference_agent():
    with pytest.raises(ConfigError, match=r"^config\.extract\.writer='offline': .*env 'math'"):
        check_config(_config(env="math"), environ={})
    with pytest.raises(ConfigError, match=r"^config\.policy\.backend='reference'"):
        check_config(_config(env="math", policy__backend="reference", extract__writer="llm",
                             extract__endpoint__base_url="http://127.0.0.1:9/v1", extract__endpoint__model="m"),
                     environ={})


# ------------------------------------------------------------------ WebWalkerQA: tasks and split


def test_webwalker_files_give_the_worlds_with_levels_from_difficulty(qa_files, monkeypatch):
    train, test = qa_files
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)
    config = _config(env="webwalker", webwalker__train_file=str(train), webwalker__eval_file=str(test),
                     webwalker__include_root_url=True)
    check_config(config, environ=KEYS)
    worlds = acting.Worlds.of(config)
    assert isinstance(worlds.train, WebQAEnv) and isinstance(worlds.test, WebQAEnv)
    assert len(worlds.train.tasks()) == 9 and len(worlds.test.tasks()) == 4
    first = worlds.train.tasks()[0]
    assert first.metadata["level"] == "easy" and first.metadata["difficulty_level"] == "easy"
    assert "Start from the website https://site.example/" in first.question
    assert [t.metadata["level"] for t in acting.pick(worlds.train.tasks(), 3)] == ["easy", "medium", "hard"]
    assert [tool.spec.name for tool in worlds.train.tools(first)] == ["search", "visit"]
    assert worlds.train.score(first, "The answer is answer 0") == 1.0
    assert worlds.test.score(worlds.test.tasks()[0], "answer 7") == 0.0
    key = _key(config)
    assert key["webwalker"]["train_file"] == str(train) and "simweb" not in key
    assert _key(dataclasses.replace(config, webwalker=dataclasses.replace(config.webwalker, judge="llm"))) != key


def test_one_file_splits_by_a_seeded_fraction_whatever_its_order(tmp_path):
    lines = [_line(i, "medium") for i in range(20)]
    forward = WebWalkerSection(train_file=str(_write(tmp_path / "a.jsonl", lines)), eval_fraction=0.25)
    backward = dataclasses.replace(forward, train_file=str(_write(tmp_path / "b.jsonl", lines[::-1])))
    train, test = acting.webwalker_tasks(forward)
    assert len(test) == 5 and len(train) == 15
    assert not {t.task_id for t in train} & {t.task_id for t in test}
    assert {t.task_id for t in acting.webwalker_tasks(backward)[1]} == {t.task_id for t in test}
    reseeded = acting.webwalker_tasks(dataclasses.replace(forward, split_seed=1))[1]
    assert {t.task_id for t in reseeded} != {t.task_id for t in test}
    # The training world keeps the file's order.
    ids = [t.task_id for t in acting.webwalker_tasks(forward)[0]]
    assert ids == [t.task_id for t in train]


# ------------------------------------------------------------------ WebWalkerQA: start-up checks


def _webwalker_error(environ, **overrides) -> str:
    with pytest.raises(ConfigError) as caught:
        check_config(_config(env="webwalker", **overrides), environ=environ)
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and SECRET not in message
    return message


def test_webwalker_start_up_checks_name_the_key(qa_files, tmp_path):
    train, test = qa_files
    assert _webwalker_error(KEYS).startswith("config.webwalker.train_file: env 'webwalker' needs")
    assert _webwalker_error(KEYS, webwalker__train_file=str(tmp_path / "nope.jsonl")).startswith(
        f"config.webwalker.train_file={str(tmp_path / 'nope.jsonl')!r}: no such file")
    assert _webwalker_error(KEYS, webwalker__train_file=str(train), webwalker__eval_file="/no/eval.jsonl").startswith(
        "config.webwalker.eval_file='/no/eval.jsonl': no such file")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_line(0, "easy")) + "\n" + json.dumps({"question": "q", "root_url": "https://x/"}) + "\n")
    message = _webwalker_error(KEYS, webwalker__train_file=str(bad))
    assert message.startswith("config.webwalker:") and "bad.jsonl:2" in message and "'answer'" in message
    one = _write(tmp_path / "one.jsonl", [_line(0, "easy")])
    assert "held-out world has no tasks" in _webwalker_error(KEYS, webwalker__train_file=str(one))


@pytest.mark.parametrize("missing, key", [("SERPER_API_KEY", "search_api_key_env"),
                                          ("JINA_API_KEY", "visit_api_key_env")])
def test_webwalker_names_a_missing_tool_key_variable_never_its_value(qa_files, missing, key):
    environ = {name: value for name, value in KEYS.items() if name != missing}
    message = _webwalker_error(environ, webwalker__train_file=str(qa_files[0]))
    assert message.startswith(f"config.webwalker.{key}='{missing}':") and f"${missing}" in message


def test_webwalker_llm_judge_and_summarizer_need_their_endpoints(qa_files):
    files = {"webwalker__train_file": str(qa_files[0])}
    assert _webwalker_error(KEYS, webwalker__judge="llm", **files).startswith(
        "config.webwalker.judge_endpoint.base_url='': webwalker.judge='llm' needs an http(s) URL")
    judge = {"webwalker__judge": "llm", "webwalker__judge_endpoint__base_url": "http://127.0.0.1:9/v1",
             "webwalker__judge_endpoint__model": "judge", "webwalker__judge_endpoint__api_key_env": "JUDGE_KEY"}
    assert _webwalker_error(KEYS, **files, **judge).startswith(
        "config.webwalker.judge_endpoint.api_key_env='JUDGE_KEY': webwalker.judge='llm' reads the API key from $JUDGE_KEY")
    check_config(_config(env="webwalker", **files, **judge), environ={**KEYS, "JUDGE_KEY": SECRET})
    assert _webwalker_error(KEYS, webwalker__summarizer__base_url="http://127.0.0.1:9/v1", **files).startswith(
        "config.webwalker.summarizer.model:")
    assert _webwalker_error(KEYS, policy__backend="reference", **files).startswith("config.policy.backend='reference'")
    assert required_env_vars(_config(env="webwalker", **files, **judge)) == {
        "webwalker.search_api_key_env": "SERPER_API_KEY", "webwalker.visit_api_key_env": "JINA_API_KEY",
        "webwalker.judge_endpoint.api_key_env": "JUDGE_KEY"}
    assert required_env_vars(_config()) == {}


# ------------------------------------------------------------------ WebWalkerQA: acting through the loop's rollouts


class SearchThenAnswer:
    """A policy that searches once, visits the first hit, then answers with the page's fact."""

    def chat(self, conversations, params):
        replies = []
        for messages in conversations:
            seen = "\n".join(m.content for m in messages)
            if "Fact page says:" in seen:
                fact = seen.rsplit("Fact page says:", 1)[1].split()[0:2]
                replies.append(Completion(text=f"<answer>{' '.join(fact)}</answer>"))
            elif "URL: " in seen:
                url = seen.split("URL: ", 1)[1].split()[0]
                call = {"name": "visit", "arguments": {"url": url, "goal": "the fact"}}
                replies.append(Completion(text=f"<tool_call>\n{json.dumps(call)}\n</tool_call>"))
            else:
                call = {"name": "search", "arguments": {"query": "the fact"}}
                replies.append(Completion(text=f"<tool_call>\n{json.dumps(call)}\n</tool_call>"))
        return replies


def _web(request: Request) -> Reply:
    if request.path == "/search":
        return Reply(json_body={"organic": [{"title": "Fact", "link": "https://site.example/fact", "snippet": "..."}]})
    if request.path.startswith("/jina/"):
        return Reply(json_body={"data": {"content": "Fact page says: answer 0 is the fact."}})
    if request.path == "/v1/chat/completions":  # each judge family in its own reply format
        return chat_reply("The answer matches.\nGRADE: CORRECT" if b"GRADE" in request.body else "Correct")
    return Reply(status=404, text="unknown path")


def test_webwalker_rollouts_use_the_configured_tools_and_llm_judge(qa_files, tmp_path, monkeypatch):
    for name, value in {**KEYS, "JUDGE_KEY": SECRET}.items():
        monkeypatch.setenv(name, value)
    with ScriptedServer(_web) as server:
        config = _config(env="webwalker", webwalker__train_file=str(qa_files[0]), webwalker__eval_file=str(qa_files[1]),
                         webwalker__search_base_url=server.url, webwalker__visit_base_url=server.url + "/jina",
                         webwalker__judge="llm", webwalker__judge_endpoint__base_url=server.url + "/v1",
                         webwalker__judge_endpoint__model="judge", webwalker__judge_endpoint__api_key_env="JUDGE_KEY",
                         agent__max_llm_calls=4)
        check_config(config)
        worlds = acting.Worlds.of(config)
        tasks = acting.pick(worlds.train.tasks(), 2)
        found = acting.rollouts(SearchThenAnswer(), acting.agent_config(config), worlds.train, tasks, samples=1,
                                seed=0, directory=tmp_path, prefix="rollouts", batch_tasks=2, progress=False)
    assert [t.prediction for t in found] == ["answer 0", "answer 0"]
    assert all(t.reward == 1.0 for t in found)  # the scripted judge says Correct to both
    paths = [r.path for r in server.requests]
    assert paths.count("/search") == 2 and paths.count("/v1/chat/completions") == 2
    assert sum(p.startswith("/jina/https://site.example/fact") for p in paths) == 2
    search = next(r for r in server.requests if r.path == "/search")
    assert search.headers.get("X-Api-Key") == SECRET
    assert (tmp_path / "rollouts_0000.jsonl").exists() and SECRET not in (tmp_path / "rollouts_0000.jsonl").read_text()
    # The release grades training rollouts with its teacher-style judge and evaluates with equivalence.
    assert (worlds.train.judge.family.name, worlds.test.judge.family.name) == ("teacher", "equivalence")
    assert all(b"GRADE" in r.body for r in server.requests if r.path == "/v1/chat/completions")
