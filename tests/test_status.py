"""Where --status gets a process's RSS and CPU: psutil, tolerant of the dead."""

import os
import subprocess

import psutil
import pytest

from osproject.server import status

pytestmark = pytest.mark.timeout(30)


def test_usage_of_a_live_process_is_what_psutil_sees():
    row = status.usage(os.getpid())
    assert row["rss"] > 1 << 20 and row["cpu"] > 0


def test_usage_of_a_process_gone_since_the_listing_is_unknown():
    proc = subprocess.Popen(["true"])
    proc.wait()                       # reaped: the pid names nothing of ours now
    assert status.usage(proc.pid) == {"rss": None, "cpu": None}


def test_usage_of_a_process_we_may_not_look_at_is_unknown(monkeypatch):
    def denied(pid):
        raise psutil.AccessDenied(pid)
    monkeypatch.setattr(status.psutil, "Process", denied)
    assert status.usage(os.getpid()) == {"rss": None, "cpu": None}
