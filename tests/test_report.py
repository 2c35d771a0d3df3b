"""The client's report: held results, corrections, summary, exit status."""

import io
import json

from osproject.report import EXIT_ALTERED, EXIT_OK, Report, show_path


def test_unchecked_results_wait_for_the_end_and_take_corrections():
    out = io.StringIO()
    report = Report(out, as_json=True)
    report.add("a", "NEW", "1" * 32, unchecked=True, key="/abs/a")
    report.add("b", "NEW", "2" * 32, unchecked=True, key="/abs/b")
    report.add("c", "OK", "3" * 32)
    assert [json.loads(line)["path"] for line in out.getvalue().splitlines()] == ["c"]
    report.correct("/abs/b", "NEW", "f" * 32)
    assert report.finish() == EXIT_OK
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[1:3] == [{"path": "a", "status": "NEW", "md5": "1" * 32},
                          {"path": "b", "status": "NEW", "md5": "f" * 32}]
    assert lines[3] == {"summary": {"OK": 1, "NEW": 2}}


def test_changed_or_missing_exit_1_and_human_lines_skip_ok():
    out = io.StringIO()
    report = Report(out)
    report.add("same", "OK", "1" * 32)
    report.add("gone", "MISSING", expected="2" * 32)
    assert report.finish() == EXIT_ALTERED
    assert out.getvalue().splitlines() == ["MISSING  gone", "2 files: 1 OK, 1 MISSING"]


def test_paths_are_shown_escaped_on_a_terminal():
    assert show_path("a\nb") == "a\\nb"
    assert show_path("caf\udce9") == "caf\\xe9"
