"""Tag parsing is linear: degenerate outputs (thousands of unclosed tags) parse at once, correctly.

A backtracking regex took about 40 s on 20,000 unclosed `<python>` tags, on the event loop. The
inputs here are five times larger; the timeout only turns a regression into a failure, not a hang.
"""

import pytest
from tidal.envs.code import extract_solution
from tidal.envs.qa import FORMAT_PENALTY, QAEnv
from tidal.envs.tools import PythonTool, SearchTool, parse_tool_call
from tidal.envs.tools.python import extract_code
from tidal.envs.tools.tags import first_tagged

N = 100_000


def test_first_tagged_matches_the_regex_semantics():
    assert first_tagged("x <a>1</a> <a>2</a>", "a") == ("1", 2, 10)
    assert first_tagged("<a><a>1</a>", "a") == ("<a>1", 0, 11)  # leftmost opening tag with a close after it
    assert first_tagged("<a>open only", "a") is None
    assert first_tagged("</a><a>", "a") is None


@pytest.mark.timeout(60)
def test_degenerate_outputs_are_no_calls():
    assert extract_code("<python>" * N) is None
    assert PythonTool(fenced=False).parse("<python>" * N) is None
    assert SearchTool(index=None).parse("<search>" * N) is None
    assert parse_tool_call("<tool_call>{" * N) is None
    assert parse_tool_call("<tool_call><tool_name>a</tool_name><arguments>" * N) is None
    assert extract_solution("<python>" * N) is None
    env = QAEnv()
    env.reset(seed=0)
    assert env.step("<answer>" * N)[1] == FORMAT_PENALTY


@pytest.mark.timeout(60)
def test_a_call_after_degenerate_text_is_still_found():
    code, cut = extract_code("```" * N + "\n<python>print(1)</python>")
    assert code == "print(1)" and cut.endswith("</python>")
    call, _ = parse_tool_call("<tool_call" * N + '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>')
    assert (call.name, call.arguments, call.error) == ("add", {"a": 1}, None)
    malformed, _ = parse_tool_call("<tool_call>add(1, 2)</tool_call>")
    assert malformed.error is not None and "<tool_name>" in malformed.error
