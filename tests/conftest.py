"""Fixtures that run the real thing: a server subprocess on a private FIFO.

Every process a test starts is stopped and reaped by the fixture, and the
fixture fails the test if a worker outlives its server.  Shared helpers are
in helpers.py.
"""

import os
import signal

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
    and bin/integrity-server), `user` a uid to run it as.
    """
    servers = []

    def start(*args, workers=5, ready=True, fifo=None, base=None, command=None, user=None):
        directory = (base or tmp_path) / f"server{len(servers)}"
        server = ServerProcess(directory, args, fifo, command, user)
        servers.append(server)
        return server.wait_ready(workers) if ready else server
    yield start
    problems = []
    for server in reversed(servers):          # every server is stopped, come what may
        try:
            server.cleanup()
        except AssertionError as exc:
            problems.append(str(exc))
    for server in servers:
        if server.proc.returncode != -signal.SIGKILL and os.path.exists(server.fifo):
            problems.append(f"the entrance FIFO {server.fifo} outlived its server")
    assert not problems, problems


@pytest.fixture
def server(start_server):
    return start_server()
