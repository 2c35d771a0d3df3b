"""The client's report: held results, corrections, order, summary, exit status."""

import io
import json
import os

from osproject.client.findings import Finding
from osproject.client.report import EXIT_ALTERED, EXIT_OK, Report, format_status, show_path


def finding(path, status, md5=None, unchecked=False, **extra):
    return Finding(path, "/abs/" + path, status, md5=md5, unchecked=unchecked, **extra)


def finish(report):
    report.release()
    return report.summary()


def test_results_wait_for_the_end_sorted_and_take_corrections():
    out = io.StringIO()
    report = Report(out, as_json=True)
    report.add(finding("b", "NEW", "2" * 32, unchecked=True))
    report.add(finding("a", "NEW", "1" * 32, unchecked=True))
    report.add(finding("c", "OK", "3" * 32))
    assert out.getvalue() == "", "nothing before the end"
    report.correct("/abs/b", "NEW", "f" * 32)
    assert finish(report) == EXIT_OK
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[:2] == [{"path": "a", "status": "NEW", "md5": "1" * 32},
                         {"path": "b", "status": "NEW", "md5": "f" * 32}]
    assert lines[3]["summary"] == {"OK": 1, "NEW": 2} and lines[3]["entries"] == 3


def test_changed_or_missing_exit_1_and_human_lines_skip_ok():
    out = io.StringIO()
    report = Report(out)
    report.add(finding("same", "OK", "1" * 32))
    report.add(finding("gone", "MISSING", altered=True))
    assert finish(report) == EXIT_ALTERED
    assert out.getvalue().splitlines() == ["MISSING  gone", "2 entries: 1 OK, 1 MISSING"]


def test_a_report_is_in_tree_order_however_it_arrives():
    out = io.StringIO()
    report = Report(out)
    for path in ("a-b", "a/z", "b", "a", "a/b"):
        report.add(finding(path, "NEW", altered=True))
    finish(report)
    assert [line.split()[1] for line in out.getvalue().splitlines()[:-1]] == [
        "a", "a/b", "a/z", "a-b", "b"]


def test_paths_are_shown_escaped_on_a_terminal():
    assert show_path("a\nb") == "a\\nb"
    assert show_path("caf\udce9") == "caf\\xe9"


def test_status_table_shows_a_dash_where_a_slot_has_no_process():
    status = {"pid": 42, "uptime": 93784.2, "rss": 20 * 2**20, "cpu": 1.5, "clients": 1,
              "waiting": 3, "totals": {"files": 9, "warnings": 3, "bans": 1, "reforks": 2},
              "workers": [{"slot": 0, "state": "idle", "forks": 1, "pid": 1234,
                           "uptime": 5.9, "files": 1520, "warnings": 0,
                           "rss": 15 * 2**20, "cpu": 0.25},
                          {"slot": 1, "state": "busy", "forks": 1, "pid": 1235,
                           "uptime": 5.0, "files": 7, "warnings": 1,
                           "rss": None, "cpu": None},
                          {"slot": 2, "state": "down", "forks": 3}]}
    assert format_status(status).splitlines() == [
        "integrity-server pid 42, uptime 1d 2:03:04, rss 20.0M, cpu 1.50s, "
        "1 other client(s), 3 file(s) waiting",
        "SLOT  STATE  PID   UPTIME   FILES  WARNINGS  RSS    CPU    FORKS",
        "0     idle   1234  0:00:05  1520   0         15.0M  0.25s  1",
        "1     busy   1235  0:00:05  7      1         -      -      1",
        "2     down   -     -        -      -         -      -      3",
        "totals: 9 files done, 3 warnings, 1 bans, 2 re-forks"]


def test_held_results_wait_on_disk_not_in_memory():
    import tracemalloc
    report = Report(open(os.devnull, "w"))
    tracemalloc.start()
    try:
        for i in range(20_000):
            report.add(finding(f"d/f{i:05}", "NEW", "a" * 32, unchecked=True))
        finish(report)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        report.out.close()
    # 20,000 records held in memory take about 10 MB; a few buffers take < 1 MB.
    assert peak < 2 * 2**20, f"{peak} bytes at the peak"


def test_the_reader_counts_each_file_of_an_ok_frame_once_whatever_the_frame_repeats():
    """A clean night's files are counted in one go per request (record_oks):
    an index twice, one the request does not hold, one of a request answered
    already or never asked are ignored, and the request's last file frees its
    checker's place."""
    import threading
    from types import SimpleNamespace

    from osproject.client.catalog import FILE, Record
    from osproject.client.checkers import Client, _Request
    from osproject.client.lister import Entry
    md5 = "0" * 32

    def entry(i, covered=True):
        was = Record(b"/t/f%d" % i, FILE, 0o644, 0, 0, 5, 100 + i, 1, 7, 8, md5=md5)
        return Entry(f"t/f{i}", f"/t/f{i}", f"/t/f{i}.md5", 5, md5, (1, 2), was,
                     was._replace(md5=None), md5, covered=covered)

    report = Report(io.StringIO())
    client = Client(connection=None, report=report)
    checker = SimpleNamespace(places=threading.Semaphore(0))
    client.waiting[7] = _Request(checker, [entry(0), entry(1), entry(2), entry(3, False)])
    client.route({"ok": [[7, 0, 0, 5, 2, -1]]})
    assert (report.received, report.counts["OK"]) == (2, 2)
    assert not checker.places.acquire(blocking=False), "two files still due"
    client.route({"ok": [[8, 0], [7, 1, 3]]})       # 8: never asked
    assert (report.received, report.counts["OK"]) == (4, 3), "the uncovered one is held"
    assert checker.places.acquire(blocking=False) and client.waiting == {}
    client.route({"ok": [[7, 1]]})                  # answered in full already
    assert report.received == 4


def test_a_file_whose_sidecar_path_no_request_can_name_is_an_error_of_its_own():
    """(A --store mirror deeper than PATH_MAX.)  The server would refuse the
    request, and the whole run with it: the client answers that file ERROR
    and asks for the rest."""
    from osproject.client.catalog import FILE, Record
    from osproject.client.checkers import Client
    from osproject.client.lister import Entry
    deep_store = "/s" + "/" + "d" * 8200

    def entry(name, sidecar):
        now = Record(b"/t/" + name.encode(), FILE, 0o644, 0, 0, 5, 100, 1, 7, 8)
        return Entry(f"t/{name}", f"/t/{name}", sidecar, 5, None, (1, 2), None, now)

    report = Report(io.StringIO())
    client = Client(connection=None, report=report)
    _, item = client.prepare(entry("far", deep_store + "/t/far.md5"))
    assert item is None and report.received == 1
    _, item = client.prepare(entry("near", "/s/t/near.md5"))
    assert item is not None and item.path == "/t/near"
    _, item = client.prepare(entry("n" * 1025, None))      # no file system has such a name
    assert item is None and report.received == 2
    report.release()
    assert report.counts["ERROR"] == 2
