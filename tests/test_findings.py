"""findings.py's rules, and the reader's shortcut for a file as recorded: no processes."""

import io
import os

import pytest

from osproject.client import catalog, findings
from osproject.client.lister import Entry
from osproject.client.report import Report

MD5 = "0123456789abcdef" * 2
OTHER = "f" * 32


def entry(tmp_path, **change):
    """A file the catalog has, found as it recorded it (unless `change` says otherwise)."""
    path = tmp_path / "f"
    path.write_text("x")
    was = catalog.record_from_stat(str(path), os.lstat(path), md5=MD5)
    now = catalog.record_from_stat(str(path), os.lstat(path))
    now = now._replace(**{k: v for k, v in change.items() if k in now._fields})
    return Entry(str(path), str(path), str(path) + ".md5", 1, MD5, (1, 2), was, now,
                 sidecar_md5=change.get("sidecar_md5", MD5), covered=True)


def counts(report):
    return report.received, dict(report.counts), report.files_verified, report.altered, \
        report.exit_status()


@pytest.mark.parametrize("change, status, md5, unchecked", [
    ({"mode": 0o4755}, "OK", MD5, False),          # a setuid bit added
    ({"uid": 65534}, "OK", MD5, False),
    ({"sidecar_md5": OTHER}, "OK", MD5, False),    # its sidecar rewritten
    ({"sidecar_md5": None}, "OK", MD5, False),     # ... or removed
    ({}, "CHANGED", OTHER, False),
    ({}, "OK", MD5, True),                         # one worker's word only
    ({"size": 2}, "OK", MD5, False),
])
def test_only_a_file_as_recorded_to_the_last_attribute_takes_the_shortcut(
        tmp_path, change, status, md5, unchecked):
    assert findings.as_recorded(entry(tmp_path), "OK", MD5)
    assert not findings.as_recorded(entry(tmp_path, **change), status, md5, unchecked)


def test_the_shortcut_counts_what_the_long_way_counts(tmp_path):
    long, short = Report(io.StringIO()), Report(io.StringIO())
    for _ in range(3):
        long.add(findings.of_file(entry(tmp_path), "OK", MD5, None, update=False))
        short.add_as_recorded()
    assert counts(long) == counts(short) == (3, {**dict.fromkeys(long.counts, 0), "OK": 3},
                                             3, 0, 0)
    long.release(), short.release()
    assert long.out.getvalue() == short.out.getvalue() == ""
