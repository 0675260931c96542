"""Granularity statistics: per-item heuristics, pool shares, the CLI entry and the stored report."""

import json
import re
import subprocess
import sys

import pytest

from expint_jax import cli
from expint_jax.cli.granularity import main
from expint_jax.experience.bank import ExperiencePool, read_pool, write_pool
from expint_jax.experience.granularity import (
    GranularityReport,
    ItemFeatures,
    analyze,
    analyze_pool,
    item_features,
    read_report,
    write_report,
)


@pytest.mark.parametrize("text, expected", [
    # (url, number, entity, strategy)
    ("Pointer following: When search results only show snippets, open the best page before answering.",
     (False, False, False, True)),
    ("If a page cannot be opened, return to the link list.", (False, False, False, True)),
    ("Verify claims against the primary source.", (False, False, False, True)),  # an imperative
    ("When searching, prefer URLs and PDF files from the site.", (False, False, False, True)),
    ("Expand the search when initial attempts fail.", (False, False, False, True)),
    ("The founding year of Acme Corp is on https://acme.example.org/about.", (True, False, True, False)),
    ("Useful query: Searching 'acme history' finds the about page.", (False, False, True, False)),
    ("Check en.wikipedia.org first for the museum.", (True, False, False, True)),  # concrete, still advice
    ("The budget is $88,027,000 according to the report.", (False, True, False, False)),
    ("See the 11th edition.", (False, True, False, False)),
    ("Model A320 appears in the fleet list.", (False, True, True, False)),
    ("The report was written by Ada Moreno.", (False, False, True, False)),
    ("Stanford lists it.", (False, False, False, False)),  # a capitalized first word is a sentence start
    ("Answer found. Stanford lists it.", (False, False, False, False)),
    ("Answer found; the list is at Stanford.", (False, False, True, False)),
])
def test_item_features(text, expected):
    assert item_features(text) == ItemFeatures(*expected)


# Hand-labelled: advice as people write it, in none of our writers' phrasings ...
STRATEGIES = [
    "Prefer official sources over aggregators.",
    "Avoid answering before opening at least one page.",
    "Always cross-check a date on a second source.",
    "Never trust a snippet without opening the page.",
    "Do not infer missing values; report them as absent.",
    "Don't stop at the first search result.",
    "First locate the official site, then navigate its links.",
    "Double-check units before converting.",
    "Break multi-hop questions into single lookups.",
    "Be skeptical of undated pages.",
    "Search within the site before searching the web.",
    "Look for a table of contents on long pages.",
    "For questions about dates, check the page's revision history.",
    "To find a person's role, open the staff directory.",
    "Rather than guessing, open the linked page.",
    "Instead of rephrasing the same query, broaden it.",
    "The agent should verify each hop before answering.",
    "Answers must cite the page they come from.",
    "It is better to open two sources than to trust one snippet.",
    "Verifying every hop against the page text prevents wrong answers.",
    "Source check: Report the absence of a value rather than guessing it.",
    "If the page fails to load, retry once and use the cached copy.",
    "Once a candidate answer appears, confirm it on the page itself.",
]
# ... and statements that are not advice: facts, what happened, pointers, nouns that look like verbs.
NOT_STRATEGIES = [
    "The founding year of Acme Corp is on the about page.",
    "The report was written by Ada Moreno.",
    "Search results only show snippets for this site.",
    "Use of the archive was restricted in 2010.",
    "Report is due on the first Monday.",
    "The agent answered without opening any page.",
    "Failed attempt: the agent searched for the wrong year.",
    "Key fact: The festival moved to Lyon in 2019.",
    "Useful query: Searching 'acme history' finds the about page.",
    "See the 11th edition.",
    "Answer found. Stanford lists it.",
    "Check-in data for the season is incomplete.",
    "The museum's opening hours are listed on the visitor page.",
    "Searching the archive took three tries.",
    "The correct answer was 1923, not 1932.",
]


@pytest.mark.parametrize("text", STRATEGIES)
def test_strategies_as_people_write_them(text):
    assert item_features(text).strategy


@pytest.mark.parametrize("text", NOT_STRATEGIES)
def test_statements_that_give_no_advice(text):
    assert not item_features(text).strategy


def test_the_release_principle_pool_reads_as_strategies(release_file):
    """Every item of the release's principle-level example is advice: an imperative
    ("Prioritize named sources ...", "Treat explicit source references ...") or a conditional."""
    pool = read_pool(release_file("official_experiences_example.json"))
    missed = [item.text for item in pool if not item_features(item.text).strategy]
    assert missed == [] and analyze_pool(pool).strategy_share == 1.0


# Hosts of WebWalkerQA root URLs (../shared/data/webwalkerqa.jsonl), one per top-level label there.
@pytest.mark.parametrize("host", ["ehaweb.org", "illuvium.io", "riotgames.com/en", "sandbox.game/en/", "cbd.int",
                                  "www2.scut.edu.cn/cs/", "ciga.me"])
def test_bare_domains_with_any_top_level_label(host):
    assert item_features(f"The schedule is listed on {host} under events.").url
    assert item_features(f"赛程见{host}的页面").url  # no space around it in Chinese prose


@pytest.mark.parametrize("text", [
    "Use primary sources, e.g. official pages, i.e. not forums.",
    "Version v1.2.3 replaced 2.0.1rc; see section 4.b of the 3.5mm spec.",
    "Open page.html, notes.md or data.json before Node.js docs.",
    "Call os.path.join(a, b) or math.sqrt(x) to compute it.",
    "The U.S. and Ph.D. rules apply at 9 a.m. daily.",
    "Nothing was found.The next step is a search.",  # a missing space before a capitalized word
])
def test_dotted_words_that_are_not_domains(text):
    assert not item_features(text).url


def test_every_webwalkerqa_root_url_host_is_a_domain(release_file):
    rows = [json.loads(line) for line in release_file("webwalkerqa.jsonl").read_text().splitlines() if line.strip()]
    hosts = {re.sub(r"^https?://(www\.)?", "", row["root_url"]) for row in rows}
    assert len(hosts) > 10
    missed = sorted(host for host in hosts if not item_features(f"Start from {host} and follow its links.").url)
    assert missed == []


def test_shares_and_empty_pool():
    report = analyze(["When a, b.", "Ada Moreno directs it, see https://x.org.", "Plain advice."])
    assert report == GranularityReport(3, 1 / 3, 0.0, 1 / 3, 1 / 3)
    assert analyze([]) == GranularityReport(0, 0.0, 0.0, 0.0, 0.0)


def test_release_example_is_abstract(release_file):
    report = analyze_pool(read_pool(release_file("official_experiences_example.json")))
    assert report.items == 15 and report.url_share == report.number_share == report.entity_share == 0.0


def test_main_prints_a_table_and_stores_the_report(tmp_path, capsys):
    pool = ExperiencePool.from_mapping({"G0": "When a, b.", "G1": "See https://x.org/a for 1923."},
                                       granularity="instance")
    write_pool(tmp_path / "pool.jsonl", pool)
    write_pool(tmp_path / "flat.json", pool)
    assert main([str(tmp_path / "pool.jsonl"), str(tmp_path / "flat.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["pool", "items", "URL/domain", "numbers", "entities", "strategy"]
    assert lines[1].split()[1:] == ["2", "50.0%", "50.0%", "0.0%", "50.0%"] == lines[2].split()[1:]
    assert main([str(tmp_path / "pool.jsonl"), "--out", str(tmp_path / "iter_001" / "granularity.json")]) == 0
    stored = json.loads((tmp_path / "iter_001" / "granularity.json").read_text())
    assert GranularityReport.from_json(stored) == GranularityReport(2, 0.5, 0.5, 0.0, 0.5)


def test_main_reports_bad_files(tmp_path, capsys):
    (tmp_path / "bad.json").write_text('{"G0": 1}')
    assert main([str(tmp_path / "bad.json")]) == 2
    assert "bad.json" in capsys.readouterr().err


def test_the_expint_command_dispatches_granularity(tmp_path, capsys):
    pool = ExperiencePool.from_mapping({"G0": "When a, b.", "G1": "See ciga.me for 1923."}, granularity="instance")
    write_pool(tmp_path / "pool.json", pool)
    assert cli.main(["granularity", str(tmp_path / "pool.json"), "--out", str(tmp_path / "report.json")]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[1:] == ["2", "50.0%", "50.0%", "0.0%", "50.0%"]
    assert read_report(tmp_path / "report.json") == GranularityReport(2, 0.5, 0.5, 0.0, 0.5)
    # In a fresh process, as a user runs it: a bad pool is exit status 2 naming the file.
    (tmp_path / "bad.json").write_text("[]")
    done = subprocess.run([sys.executable, "-m", "expint_jax.cli", "granularity", str(tmp_path / "bad.json")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "bad.json" in done.stderr


def test_write_report_round_trips(tmp_path):
    report = GranularityReport(4, 0.25, 0.5, 0.75, 1.0)
    write_report(tmp_path / "g.json", report)
    assert read_report(tmp_path / "g.json") == report
    (tmp_path / "g.json").write_text('{"items": 4, "url_share": "high"}')
    with pytest.raises(ValueError, match=r"g\.json: key 'url_share' must be a number"):
        read_report(tmp_path / "g.json")
