"""Fixtures that run the real thing: a server subprocess on a private FIFO.

Every server a test starts goes through `start_server` (or `server`), which
stops and reaps it at teardown and fails the test if anything it started
outlives it: a process (a worker, seen or not), its entrance FIFO, or a
temp sidecar of one of its workers.  Shared helpers are in helpers.py.

Tests that start no process of ours are marked `unit` here, at collection
(`make unit` runs them alone); one that starts our programs without the
fixtures says so with @pytest.mark.processes, and a `unit` test that starts
a Python process fails, so that the mark cannot lie.

make test runs the tests side by side (pytest -n); one marked `alone` gets
the machine to itself (machine_share).
"""

import fcntl
import os
import re
import shlex
import subprocess
import sys

import pytest

from helpers import CLIENT, SERVER, ServerProcess

SERVER_FIXTURES = {"start_server", "server"}
_PROGRAM = re.compile(r"python[\d.]*|integrity-(server|client)")


def pytest_collection_modifyitems(items):
    for item in items:
        if not SERVER_FIXTURES & set(item.fixturenames) and \
                item.get_closest_marker("processes") is None:
            item.add_marker(pytest.mark.unit)


class _UnitPopen(subprocess.Popen):
    """subprocess.Popen for a `unit` test: a Python process is refused."""

    nodeid = None

    def __init__(self, args, *rest, **kwargs):
        words = shlex.split(args) if isinstance(args, str) else [os.fsdecode(a) for a in args]
        if any(w in (sys.executable, SERVER, CLIENT) or _PROGRAM.fullmatch(os.path.basename(w))
               for w in words):
            pytest.fail(f"{self.nodeid} starts {words[:4]}: it is no unit test; give it "
                        "the server fixture or mark it @pytest.mark.processes",
                        pytrace=False)
        super().__init__(args, *rest, **kwargs)


@pytest.fixture(autouse=True)
def machine_share(request, tmp_path_factory):
    """Tests run side by side (make test: pytest -n); one marked `alone` has
    the machine to itself: it waits for those running to end, and those not
    yet started wait for it.  A reader-writer lock over the run's workers:
    flock(2) on two files in the directory above each worker's basetemp,
    the turnstile keeping a waiting `alone` test from starving."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent                      # shared by the run's workers
    alone = request.node.get_closest_marker("alone") is not None
    with open(base / "machine.turnstile", "a") as turnstile, \
            open(base / "machine.lock", "a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            if not alone:
                fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            if alone:
                fcntl.flock(turnstile, fcntl.LOCK_UN)


@pytest.fixture(autouse=True)
def unit_tests_start_no_python(request, monkeypatch):
    """Hold a `unit` test to its mark: it may run md5sum, not our programs."""
    if request.node.get_closest_marker("unit") is not None:
        refusing = type("UnitPopen", (_UnitPopen,), {"nodeid": request.node.nodeid})
        monkeypatch.setattr(subprocess, "Popen", refusing)


@pytest.fixture(autouse=True)
def private_catalog(tmp_path_factory, monkeypatch):
    """Each test's clients keep a catalog of their own, outside every tree the
    test makes (never in ~, never in tmp_path: tests check tmp_path itself)."""
    path = tmp_path_factory.mktemp("catalog") / "catalog.sqlite"
    monkeypatch.setenv("INTEGRITY_CATALOG", str(path))
    return path


@pytest.fixture
def start_server(tmp_path):
    """start_server(*args) -> a ready ServerProcess; all stopped at teardown.

    `base` is the directory to make the server's own in (default tmp_path),
    `command` the server's argv before its options (default: this Python
    and bin/integrity-server), `user` a uid to run it as, `env` its whole
    environment; `fifo_option=False` leaves out --fifo (give `fifo`, where
    the default entrance will be), `stderr="pipe"` gives it a pipe that
    nobody reads.  `ready=False` returns at once, `workers` is how many
    workers make it ready.
    """
    servers = []

    def start(*args, workers=5, ready=True, fifo=None, base=None, command=None, user=None,
              env=None, fifo_option=True, stderr="file"):
        directory = (base or tmp_path) / f"server{len(servers)}"
        server = ServerProcess(directory, args, fifo, command, user, env, fifo_option, stderr)
        servers.append((server, base))
        return server.wait_ready(workers) if ready else server
    yield start
    problems = []
    for server, _ in reversed(servers):        # every server is stopped, come what may
        try:
            server.cleanup()
        except AssertionError as exc:
            problems.append(str(exc))
    roots = [str(tmp_path)] + sorted({str(base) for _, base in servers if base and
                                      not os.path.abspath(base).startswith(f"{tmp_path}/")})
    for server, _ in servers:
        problems += server.leaks(roots)
    assert not problems, problems


@pytest.fixture
def server(start_server):
    return start_server()
