"""Granularity statistics: per-item heuristics, pool shares, the CLI entry and the stored report."""

import json

import pytest

from expint_jax.experience.bank import ExperiencePool, read_pool, write_pool
from expint_jax.experience.granularity import (
    GranularityReport,
    ItemFeatures,
    analyze,
    analyze_pool,
    item_features,
    main,
    write_report,
)


@pytest.mark.parametrize("text, expected", [
    # (url, number, entity, strategy)
    ("Pointer following: When search results only show snippets, open the best page before answering.",
     (False, False, False, True)),
    ("If a page cannot be opened, return to the link list.", (False, False, False, True)),
    ("Verify claims against the primary source.", (False, False, False, False)),
    ("When searching, prefer URLs and PDF files from the site.", (False, False, False, True)),
    ("Expand the search when initial attempts fail.", (False, False, False, False)),  # no leading clause
    ("The founding year of Acme Corp is on https://acme.example.org/about.", (True, False, True, False)),
    ("Useful query: Searching 'acme history' finds the about page.", (False, False, True, False)),
    ("Check en.wikipedia.org first for the museum.", (True, False, False, False)),
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


def test_write_report_round_trips(tmp_path):
    report = GranularityReport(4, 0.25, 0.5, 0.75, 1.0)
    write_report(tmp_path / "g.json", report)
    assert GranularityReport.from_json(json.loads((tmp_path / "g.json").read_text())) == report
