"""Lenient parsing of the extraction LLM's answers; property tests on arbitrary strings."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from expint_jax.experience.extract.operations import Operation
from expint_jax.experience.extract.parsers import (
    MAX_INT_DIGITS,
    ParseError,
    clean_text,
    loads_lenient,
    normalize_id,
    parse_experiences,
    parse_operations,
    parse_pool_rewrite,
)

OPS = [{"operation": "ADD", "id": None, "content": "Name: When x, do y."},
       {"operation": "UPDATE", "id": "G2", "content": "Name: better."}]


@pytest.mark.parametrize("answer", [
    json.dumps(OPS),
    "```json\n" + json.dumps(OPS) + "\n```",
    "Here you go:\n```\n" + json.dumps(OPS, indent=2) + "\n```\nDone.",
    "I will add one and update G2: " + json.dumps(OPS) + " -- that's all [end]",
    repr(OPS),  # Python style: single quotes, None
    json.dumps(OPS)[:-1] + ",]",  # trailing comma
    "[{'operation': 'ADD', 'id': null, 'content': 'Name: When x, do y.',}, "
    "{'operation': 'UPDATE', 'id': 'G2', 'content': 'Name: better.'},]",
])
def test_loads_lenient_finds_the_json(answer):
    assert loads_lenient(answer) == OPS


def test_prose_brackets_before_the_answer_are_skipped_by_the_typed_parsers():
    answer = "Note [1]: see {this}. Answer: " + json.dumps(OPS)
    assert loads_lenient(answer) == [1]  # the first JSON value, whatever it is
    assert [op.kind for op in parse_operations(answer).operations] == ["ADD", "UPDATE"]
    assert parse_pool_rewrite('As in [1] and [2]: {"G0": "a"}') == [("G0", "a")]


@pytest.mark.parametrize("answer", ["", "no json at all", "[1, 2", "{'a': f(x)}", "[" * 5000, "{**x}"])
def test_loads_lenient_raises_parse_error_only(answer):
    with pytest.raises(ParseError):
        loads_lenient(answer)


def test_parse_operations_normalizes_and_reports_rejects():
    answer = json.dumps([
        {"operation": "add", "id": None, "content": "  1. Name:   spaced\n text "},
        {"operation": "UPDATE", "id": 3, "content": "x"},
        {"operation": "DELETE", "id": "[G4]"},
        {"operation": "NONE"},
        {"operation": "MERGE", "id": "G1"},
        {"operation": "UPDATE", "content": "no id"},
        "not an object",
    ])
    parsed = parse_operations(answer)
    assert parsed.operations == (Operation("ADD", None, "Name: spaced text"), Operation("UPDATE", "G3", "x"),
                                 Operation("DELETE", "G4"), Operation("NONE"))
    assert len(parsed.rejected) == 3 and "element 4" in parsed.rejected[0]


def test_parse_operations_accepts_a_single_object_and_an_empty_list():
    assert parse_operations('{"operation": "NONE", "id": null, "content": null}').operations == (Operation("NONE"),)
    assert parse_operations('{"operations": [{"operation": "DELETE", "id": "G1"}]}').operations == (
        Operation("DELETE", "G1"),)
    assert parse_operations("[]").operations == ()


@pytest.mark.parametrize("answer", ['[{"operation": "MERGE"}]', '"ADD"', '[{"operation": "ADD", "content": ""}]'])
def test_parse_operations_rejects_answers_with_nothing_usable(answer):
    with pytest.raises(ParseError):
        parse_operations(answer)


def test_parse_experiences():
    answer = ("<think>maybe <Experiences>draft</Experiences></think>\nText.\n<Experiences>\n"
              "1. First: When a, b.\n- Second: When c, d.\n\n* First: When a, b.\n"
              "Third: When e, f.\nFourth: When g, h.\n</Experiences>")
    # The think block is the caller's to strip; here the first block wins.
    assert parse_experiences(answer, max_items=3) == ["draft"]
    body = answer.split("</think>")[1]
    assert parse_experiences(body, max_items=3) == ["First: When a, b.", "Second: When c, d.", "Third: When e, f."]
    assert parse_experiences('<experiences>["A", "B"]', max_items=5) == ["A", "B"]  # unclosed, JSON list
    for bad in ("no tags", "<Experiences>\n \n</Experiences>"):
        with pytest.raises(ParseError):
            parse_experiences(bad, max_items=3)


def test_parse_pool_rewrite_forms():
    expected = [("G0", "a"), ("G3", "b")]
    assert parse_pool_rewrite('{"G0": "a", "G3": "b"}') == expected
    assert parse_pool_rewrite('[{"id": "G0", "content": "a"}, {"id": 3, "text": "b"}]') == expected
    assert parse_pool_rewrite('{"pool": ["a", "b"]}') == [(None, "a"), (None, "b")]
    for bad in ("[]", '["a", 3]', '"a"', '{"G0": ""}'):
        with pytest.raises(ParseError):
            parse_pool_rewrite(bad)


def test_normalize_id_and_clean_text():
    assert [normalize_id(v) for v in ("G3", "g3", "[G3]", 3, " 3 ", None, "null", True, -1, "custom")] == [
        "G3", "G3", "G3", "G3", "G3", None, None, None, None, "custom"]
    assert clean_text(' 2) "Name: When x,\n do y." ') == "Name: When x, do y."
    assert clean_text("1.5x faster pages load first") == "1.5x faster pages load first"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
texts = st.text(max_size=300) | st.builds(
    lambda prefix, value, suffix, fence: prefix + (f"```json\n{json.dumps(value)}\n```" if fence else repr(value)) + suffix,
    st.text(max_size=40), json_values, st.text(max_size=40), st.booleans(),
) | st.builds(lambda a, b: f"{a}<Experiences>{b}</Experiences>", st.text(max_size=30), st.text(max_size=100))


# Runaway generations: long digit runs (Python refuses int() past 4300 digits), huge integer
# literals (hex is exempt from that limit but not printable in decimal), and deep nesting, set in
# the places the parsers look (a bare value, a list element, an id, an operation kind, a key).
digit_runs = st.builds(lambda n, digit: digit * n, st.integers(1, 12_000), st.sampled_from("0123456789"))
huge_ints = st.builds(lambda bits, sign: sign + hex((1 << bits) - 1), st.integers(200, 40_000),
                      st.sampled_from(["", "-"]))
numbers = digit_runs | huge_ints | st.builds("{}.{}e{}".format, digit_runs, digit_runs, st.integers(-999, 999))
nested = st.builds(lambda depth, open_, close, leaf: open_ * depth + leaf + close * depth, st.integers(1, 3_000),
                   st.sampled_from(["[", '{"a": ', "[{'id': "]), st.sampled_from(["]", "}", "}]"]),
                   st.sampled_from(["1", '"x"', "null", "0x" + "f" * 2000]))
runaway = numbers.flatmap(lambda n: st.sampled_from([
    n, f"[{n}]", f'{{"G0": {n}}}', f'{{"G{n}": "lesson"}}', f'[{{"operation": "UPDATE", "id": {n}, "content": "c"}}]',
    f'[{{"operation": {n}, "id": "G1"}}]', f'{{"pool": [{{"id": {n}, "text": {n}}}]}}', f"```json\n[{n}]\n```",
    f'[{{"operation": "DELETE", "id": "G{n}"}}]', f"<Experiences>[{n}]</Experiences>",
])) | nested


def assert_parse_error_at_most(text):
    for parse in (loads_lenient, parse_operations, parse_pool_rewrite, lambda t: parse_experiences(t, 3)):
        try:
            parse(text)
        except ParseError:
            pass


@settings(max_examples=300, deadline=None)
@given(texts)
def test_parsers_never_raise_anything_but_parse_error(text):
    assert_parse_error_at_most(text)


@settings(max_examples=300, deadline=None)
@given(runaway)
def test_runaway_numbers_and_nesting_raise_parse_error_at_most(text):
    assert_parse_error_at_most(text)


@pytest.mark.parametrize("answer", [
    "1" * 5000,  # json.loads raises a plain ValueError past 4300 digits
    "[" + "9" * (MAX_INT_DIGITS + 1) + "]",
    "0x" + "f" * 5000,  # a literal the ast path accepts, too long to print
    '[{"operation": "UPDATE", "id": 0x' + "f" * 5000 + ', "content": "c"}]',
])
def test_over_long_integers_invalidate_their_candidate(answer):
    with pytest.raises(ParseError):
        loads_lenient(answer)
    # The prose around them does not stop a valid answer being found.
    assert loads_lenient(answer + ' and then ["ok"]') == ["ok"]
    assert loads_lenient(f"[{10**MAX_INT_DIGITS - 1}]") == [10**MAX_INT_DIGITS - 1]


def test_over_long_ids_are_not_display_ids():
    assert normalize_id(10**MAX_INT_DIGITS) is None and normalize_id(10**MAX_INT_DIGITS - 1) is not None
    assert normalize_id(1 << 40_000) is None
    long_digits = "G" + "1" * 5000
    assert normalize_id(long_digits) == long_digits  # an unknown id, as written


id_values = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
             | st.integers(1, 40_000).map(lambda bits: (1 << bits) - 1)
             | digit_runs | digit_runs.map("g[{}]".format) | st.lists(st.integers(), max_size=3))


@settings(max_examples=300, deadline=None)
@given(id_values)
def test_normalize_id_fuzz(value):
    result = normalize_id(value)
    assert result is None or (isinstance(result, str) and result)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**MAX_INT_DIGITS:
        assert result == f"G{value}"


operation_fields = st.dictionaries(
    st.sampled_from(["operation", "id", "content", "source_task_ids", "extra"]),
    id_values | st.sampled_from(["ADD", "UPDATE", "DELETE", "NONE", "G1", "Name: lesson."]) | json_values
    | st.lists(st.text(max_size=5) | st.integers(), max_size=3),
    max_size=5,
)


@settings(max_examples=300, deadline=None)
@given(operation_fields | json_values)
def test_operation_from_json_raises_value_error_naming_where_or_round_trips(obj):
    try:
        op = Operation.from_json(obj, "cache.json: operation 3")
    except ValueError as e:
        assert str(e).startswith("cache.json: operation 3: ")
    else:
        assert Operation.from_json(op.to_json(), "again") == op


@settings(max_examples=200, deadline=None)
@given(json_values, st.text(alphabet=st.characters(blacklist_characters="[]{}\"'`"), max_size=30))
def test_json_surrounded_by_prose_is_recovered(value, prose):
    if not isinstance(value, (list, dict)):
        value = [value]
    assert loads_lenient(f"{prose} {json.dumps(value)} {prose}") == value


def test_prose_after_a_hash_is_not_a_python_comment():
    # Found by the property test above: "0# [null] 0#" parsed as the literal 0 (the rest a comment).
    assert loads_lenient("0# [null] 0#") == [None]
