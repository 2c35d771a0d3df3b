"""Fixtures that run the real thing: a server subprocess on a private FIFO.

Every server a test starts goes through `start_server` (or `server`), which
stops and reaps it at teardown and fails the test if anything it started
outlives it: a process (a worker, seen or not), its entrance FIFO, or a
temp sidecar of one of its workers.  Shared helpers are in helpers.py.
"""

import os

import pytest

from helpers import ServerProcess


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
