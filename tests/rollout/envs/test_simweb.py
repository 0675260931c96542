"""SimWeb: determinism, site structure per level, tasks, tools, scoring."""

import collections
import hashlib
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from expint_jax.rollout.envs.simweb import SimWebConfig, SimWebEnv
from expint_jax.rollout.envs.simweb.tasks import FORMS, follow, parse_question
from expint_jax.rollout.envs.simweb.tools import parse_page
from expint_jax.rollout.envs.simweb import world as world_module
from expint_jax.rollout.envs.simweb.world import canonical_url
from expint_jax.rollout.envs.web import SEPARATOR, parse_search_results
from expint_jax.rollout.tools import Tool, ToolError

CONFIG = SimWebConfig(seed=11, tasks_per_level=60)


@pytest.fixture(scope="module")
def env():
    return SimWebEnv(CONFIG)


def _digest(config: SimWebConfig) -> str:
    blob = json.dumps(SimWebEnv(config).to_json(), sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


def test_same_seed_gives_byte_identical_world_and_tasks_across_runs_and_processes():
    here = _digest(CONFIG)
    assert here == _digest(CONFIG)
    code = (
        "import hashlib, json\n"
        "from expint_jax.rollout.envs.simweb import SimWebConfig, SimWebEnv\n"
        f"env = SimWebEnv(SimWebConfig(seed={CONFIG.seed}, tasks_per_level={CONFIG.tasks_per_level}))\n"
        "blob = json.dumps(env.to_json(), sort_keys=True, ensure_ascii=False).encode()\n"
        "print(hashlib.sha256(blob).hexdigest())\n"
    )
    # A different hash seed in the child: nothing may depend on set or dict-of-str iteration order.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"}, cwd=".")
    assert out.stdout.strip() == here
    assert _digest(SimWebConfig(seed=12, tasks_per_level=60)) != here
    assert _digest(SimWebConfig(seed=11, split="test", tasks_per_level=60)) != here


def test_task_counts_ids_and_mix_per_level(env):
    tasks = env.tasks()
    assert len(tasks) == 3 * CONFIG.tasks_per_level
    assert len({t.task_id for t in tasks}) == len(tasks)
    assert len({t.question for t in tasks}) == len(tasks)
    mix = collections.Counter((t.metadata["level"], t.metadata["source"]) for t in tasks)
    for level in ("easy", "medium", "hard"):
        assert mix[(level, "single_source")] >= 10 and mix[(level, "multi_source")] >= 10, mix
    styles = collections.Counter(t.metadata["style"] for t in tasks)
    assert set(styles) == {"lookup", "chain", "compare", "arithmetic"}


def test_questions_parse_back_and_answers_follow_the_facts(env):
    for task in env.tasks():
        parsed = parse_question(task.question)
        assert parsed is not None, task.question
        assert parsed.form.key == task.metadata["form"]
        assert list(parsed.names) == task.metadata["entities"]
        assert parsed.root_url == task.metadata["root_url"]
        site = env.world.site(parsed.root_url)
        if parsed.form.style in ("lookup", "chain"):
            value, used = follow(site, site.entity(parsed.names[0]), parsed.form.path)
            assert value == task.answer
            assert [e.url for e in used] == task.metadata["answer_urls"]
        if parsed.form.style == "compare":
            assert task.answer in parsed.names


def test_every_form_is_used_somewhere():
    tasks = SimWebEnv(SimWebConfig(seed=2, tasks_per_level=150)).tasks()
    assert {t.metadata["form"] for t in tasks} == {f.key for f in FORMS}


def test_level_structure_indexing_twins_and_directories(env):
    by_level = collections.defaultdict(list)
    for site in env.world.sites:
        by_level[site.level].append(site)
    for site in by_level["easy"]:
        assert all(p.indexed for p in site.pages)
        assert not any(e.twin_of for e in site.entities)
    for level in ("medium", "hard"):
        for site in by_level[level]:
            items = [p for p in site.pages if p.role == "item"]
            assert items and not any(p.indexed for p in items)
            twins = [e for e in site.entities if e.twin_of]
            assert len(twins) == 8
            for twin in twins:  # one word differs, so a twin never contains its original
                original = site.entity(twin.twin_of)
                assert len(twin.name.split()) == len(original.name.split())
                assert original.name not in twin.name and twin.name not in original.name
    for site in by_level["hard"]:
        sections = [p for p in site.pages if p.role == "section" and "/news/" not in p.url]
        assert sections and all(not any(e.name in p.text for e in site.entities) for p in sections)
        assert all(not p.indexed for p in site.pages if p.role == "bucket")


def test_directors_and_roles_agree(env):
    for site in env.world.sites:
        for org in site.of_kind("organization"):
            assert site.entity(org.value("Director")).value("Role") == f"Director of {org.name}"


def _tools(env) -> dict[str, Tool]:
    return {tool.spec.name: tool for tool in env.tools(env.tasks()[0])}


def test_search_finds_item_pages_on_easy_sites_and_only_directories_on_medium(env):
    search = _tools(env)["search"]
    easy = next(s for s in env.world.sites if s.level == "easy")
    entity = easy.entities[0]
    hits = parse_search_results(search({"query": entity.name}))
    assert hits[0].title == entity.name and hits[0].url == entity.url
    medium = next(s for s in env.world.sites if s.level == "medium")
    entity = medium.of_kind("organization")[0]
    hits = parse_search_results(search({"query": entity.name}))
    assert entity.url not in [h.url for h in hits]
    assert f"{medium.root_url}organizations/" in [h.url for h in hits]
    assert len(hits) <= CONFIG.search_top_k


def test_search_index_is_built_once_when_first_searches_are_concurrent(env, monkeypatch):
    builds = []

    class SlowIndex(world_module.BM25Index):
        def __init__(self, documents):
            builds.append(len(documents))
            time.sleep(0.2)  # a wide window for a second thread to start its own build
            super().__init__(documents)

    monkeypatch.setattr(world_module, "BM25Index", SlowIndex)
    fresh = world_module.World(env.world.sites)
    barrier = threading.Barrier(6, timeout=10)

    def search(query):
        barrier.wait()  # all six tool threads search for the first time together
        return fresh.search(query, 3)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(search, ["festival"] * 6))
    assert len(builds) == 1 and all(r == results[0] for r in results) and results[0]


def test_search_accepts_lists_and_reports_no_results(env):
    search = _tools(env)["search"]
    out = search({"query": ["zzzqqq nothing", env.world.sites[0].name]})
    first, second = out.split(SEPARATOR)
    assert first.startswith('No results for "zzzqqq nothing"')
    assert second.startswith("Search results for")
    for bad in ({}, {"query": ""}, {"query": 3}, {"query": []}, {"query": ["ok", ""]}):
        with pytest.raises(ToolError, match="query"):
            search(bad)


def test_visit_shows_text_and_numbered_links_with_lenient_urls(env):
    visit = _tools(env)["visit"]
    site = env.world.sites[0]
    entity = site.entities[0]
    host = entity.url.split("/")[2]
    loose = "  <" + entity.url.replace(f"https://{host}", f"http://{host.upper()}") + "#top>  "
    for url in (loose, f'"{site.root_url.rstrip("/")}"'):
        assert parse_page(visit({"url": url})) is not None, url
    page = parse_page(visit({"url": entity.url}))
    assert page.title == entity.name and "Key facts:" in page.text
    assert [link.url for link in page.links][:1] == [site.root_url]
    assert visit({"url": entity.url}).splitlines()[-1].startswith(f"[{len(page.links)}] ")
    assert canonical_url("HTTP://A.example.org/x/") == canonical_url("https://a.example.org/x")


def test_visit_unknown_url_is_a_tool_error_and_lists_show_errors_in_place(env):
    visit = _tools(env)["visit"]
    with pytest.raises(ToolError, match="no page at 'https://nowhere.example.org/'"):
        visit({"url": "https://nowhere.example.org/"})
    site = env.world.sites[0]
    out = visit({"url": [site.root_url, "https://nowhere.example.org/"]}).split(SEPARATOR)
    assert parse_page(out[0]) is not None and out[1].startswith("Error: visit: there is no page")
    with pytest.raises(ToolError, match="at most 5"):
        visit({"url": [site.root_url] * 6})


def test_score_normalizes_compares_numbers_and_rejects_hedges(env):
    by_form = {t.metadata["form"]: t for t in env.tasks()}
    staff = next(t for t in env.tasks() if t.metadata["form"] in ("org_staff", "event_attendance"))
    number = staff.answer.replace(",", "")
    assert env.score(staff, staff.answer) == 1.0
    assert env.score(staff, f"{number} people") == 1.0
    assert env.score(staff, str(int(number) + 1)) == 0.0
    assert env.score(staff, None) == 0.0 and env.score(staff, "  ") == 0.0
    compare = next(t for t in env.tasks() if t.metadata["style"] == "compare")
    a, b = compare.metadata["options"]
    assert env.score(compare, f"The answer is {compare.answer}.") == 1.0
    assert env.score(compare, f"{a} or {b}") == 0.0
    date = by_form.get("event_date")
    if date is not None:
        day, month, year = date.answer.split()
        assert env.score(date, f"{month} {day}, {year}") == 1.0


def test_config_validation():
    with pytest.raises(ValueError, match="levels"):
        SimWebConfig(levels=("extreme",))
    with pytest.raises(ValueError, match=">= 1"):
        SimWebConfig(tasks_per_level=0)
    with pytest.raises(ValueError, match="url_style must be one of"):
        SimWebConfig(url_style="numbered")


def test_short_urls_rename_every_url_and_change_nothing_else():
    from expint_jax.rollout.envs.simweb.reference_agent import Mistakes, run_reference_agent

    config = SimWebConfig(seed=5, tasks_per_level=12, levels=("easy", "medium", "hard"))
    path, short = SimWebEnv(config), SimWebEnv(SimWebConfig(**{**vars(config), "url_style": "short"}))
    renamed = {}
    for number, (a, b) in enumerate(zip(path.world.sites, short.world.sites, strict=True)):
        assert b.root_url == f"https://s{number}.example.org/" and b.name == a.name
        for p, q in zip(a.pages, b.pages, strict=True):
            assert (q.title, q.text, q.role, q.indexed) == (p.title, p.text, p.role, p.indexed)
            assert q.url.startswith(b.root_url) and q.url.endswith("/") == p.url.endswith("/")
            assert len(q.url) < len(p.url) or p.url == a.root_url
            renamed[p.url] = q.url
    assert len(set(renamed.values())) == len(renamed)  # still one URL per page
    for a, b in zip(path.world.sites, short.world.sites):
        for p, q in zip(a.pages, b.pages):
            assert [(l.title, renamed[l.url]) for l in p.links] == [(l.title, l.url) for l in q.links]
            assert q.parent == (renamed[p.parent] if p.parent else None)
    for t, u in zip(path.tasks(), short.tasks(), strict=True):
        root = t.metadata["root_url"]
        assert u.question == t.question.replace(root, renamed[root]) and u.answer == t.answer
        assert u.metadata["answer_urls"] == [renamed[url] for url in t.metadata["answer_urls"]]
    # The scripted agent finds its way by titles and directories, so it acts exactly as before.
    mistakes = Mistakes(answer_early=0.35, wrong_link=0.35, skip_hop=0.35)
    assert [r.reward for r in run_reference_agent(path, n=2, seed=1, mistakes=mistakes)] == \
        [r.reward for r in run_reference_agent(short, n=2, seed=1, mistakes=mistakes)]
