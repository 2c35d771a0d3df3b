"""Regressions: clients and environments that once killed or stalled the server."""

import os
import signal
import subprocess
import sys

import pytest

from helpers import CLIENT, SERVER, make_tree, md5sum_check, run_client, sidecars_under, wait_until
from osproject import protocol
from osproject.client.connection import Connection

pytestmark = pytest.mark.timeout(90)


def hostile_session(server, payload):
    """Handshake like a real client, then send raw bytes as requests."""
    conn = Connection(server.fifo)
    conn.open()
    try:
        os.write(conn.request_fd, payload)
        wait_until(lambda: server.events("request.refused") or server.events("session.dropped"),
                   what="the server's refusal")
    finally:
        conn.close()


def still_serves(server, tmp_path, name="ok"):
    tree = tmp_path / name
    make_tree(tree, files=10)
    result = run_client(server, tree)
    assert result.status == 0, result.stderr
    assert server.proc.poll() is None


def test_frames_that_once_crashed_the_server_cost_only_their_session(server, tmp_path):
    nested = b"[" * 60000 + b"\n"
    lone = b'{"id":1,"dirs":[["/x\\ud800",1,2,null,[["y",null,1]]]]}\n'
    nul = b'{"id":1,"dirs":[["/x",1,2,null,[["y\\u0000z",null,1]]]]}\n'
    short = b'{"id":1,"dirs":[["/x",1,2,null,[["y"]]]]}\n'
    # A directory named once for 50 files: 300 KB that were 30 MB of paths
    # in the server, in assignments that killed every worker that got one.
    names = b",".join(b'["n%d",null,1]' % i for i in range(50))
    deep = b'{"id":1,"dirs":[["/' + b"a" * 300_000 + b'",1,2,null,[' + names + b']]]}\n'
    for payload in (nested, lone, nul, short, deep):
        hostile_session(server, payload)
    for reply in ("/tmp/x\\u0000", "/tmp/\\ud800"):
        hello = b'{"hello":%d,"request":"/tmp/r","reply":"%s"}\n' % (protocol.HELLO_VERSION,
                                                                    reply.encode())
        fd = os.open(server.fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, hello)
        os.close(fd)
    wait_until(lambda: len(server.events("request.refused")) >= 7, what="seven refusals")
    still_serves(server, tmp_path)
    assert server.events("worker.exited") == []
    assert server.events("server.error") == [], "a refusal must not need the safety net"


def test_long_paths_of_non_utf8_names_fit_the_frames(server, tmp_path):
    deep = os.fsencode(tmp_path / "tree")
    for level in range(12):                      # ~2.9 KB of bytes that JSON escapes
        deep = os.path.join(deep, b"\xe9" * 240 + b"%d" % level)
    os.makedirs(deep)
    for i in range(5):
        with open(os.path.join(deep, b"\xe9f%d" % i), "wb") as f:
            f.write(b"x")
    result = run_client(server, "--json", tmp_path / "tree")
    assert result.status == 0, result.stderr
    assert result.records()[1] == {"NEW": 5}


def test_sighup_after_the_log_dir_vanished_keeps_the_server_alive(server, tmp_path):
    os.rename(server.log_dir, server.log_dir + ".gone")
    server.proc.send_signal(signal.SIGHUP)
    server.log_path = os.path.join(server.log_dir + ".gone", "integrity-server.log")
    server.wait_event("log.reopen_failed")
    still_serves(server, tmp_path)
    os.rename(server.log_dir + ".gone", server.log_dir)
    server.log_path = os.path.join(server.log_dir, "integrity-server.log")


def test_a_stderr_nobody_reads_never_stalls_the_loop(start_server, tmp_path):
    server = start_server("--cross-check", "1.0", stderr="pipe")   # a pipe we never read
    tree = tmp_path / "tree"
    make_tree(tree, files=2000, size=100)          # thousands of log lines
    assert run_client(server, tree, timeout=60).status == 0
    assert run_client(server, tree, timeout=60).status == 0
    assert server.stop() == 0


def test_started_with_stdout_and_stderr_closed(start_server, tmp_path):
    server = start_server(command=["sh", "-c", 'exec "$@" >&- 2>&-', "sh", sys.executable,
                                   SERVER])
    tree = tmp_path / "tree"
    make_tree(tree, files=10)
    assert run_client(server, tree).status == 0
    assert server.stop() == 0


def test_an_entrance_too_deep_for_a_hello_is_refused_by_server_and_client(
        start_server, tmp_path):
    deep = tmp_path / ("t" * 200) / ("u" * 200)      # two FIFO paths: over 512 bytes
    deep.mkdir(parents=True)
    fifo = str(deep / "server.fifo")
    server = start_server(fifo=fifo, ready=False)
    assert server.proc.wait(30) == 2, "a server no client can reach is no server"
    [refused] = server.events("server.refused")
    assert "no client could say hello" in refused["reason"]
    assert "too long a path" in refused["reason"] and "--fifo" in refused["reason"]
    os.mkfifo(fifo, 0o600)          # as if something listened there after all
    listener = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        tree = tmp_path / "tree"
        tree.mkdir()
        result = run_client(fifo, tree)
    finally:
        os.close(listener)
        os.unlink(fifo)
    assert result.status == 2
    assert "too long a path" in result.stderr and "Traceback" not in result.stderr
    assert os.listdir(deep) == [], "the client left its directory behind"


@pytest.mark.processes
def test_a_server_gone_between_its_welcome_and_the_first_request(tmp_path):
    """It welcomes the client and never reads a request, as a server killed
    at that moment: the client's first write meets a broken pipe, and it says
    it lost the server (exit 2), never a traceback."""
    fifo = str(tmp_path / "server.fifo")
    os.mkfifo(fifo, 0o600)
    entrance = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    reply = None
    tree = tmp_path / "tree"
    make_tree(tree, files=3)
    client = subprocess.Popen([sys.executable, CLIENT, "--fifo", fifo, str(tree)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        said = bytearray()

        def hello():
            try:
                said.extend(os.read(entrance, 4096))
            except BlockingIOError:
                pass
            return said.strip() != b"" and said.endswith(b"\n")     # one hello, whole

        wait_until(hello, what="the client's hello")
        _, reply_fifo, _ = protocol.read_hello(bytes(said).strip(b"\n"))
        reply = os.open(reply_fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.write(reply, protocol.encode(protocol.welcome(1, os.getpid())))
        out, err = client.communicate(timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()
        os.close(entrance)
        if reply is not None:
            os.close(reply)
    assert (client.returncode, out, err) == (2, "", "integrity-client: lost the server: "
                                                    "Broken pipe\n")


def test_a_repair_finds_a_worker_even_when_every_worker_has_voted(start_server, tmp_path):
    server = start_server("--workers", "3", "--chaos", "liar:0", workers=3)
    tree = tmp_path / "tree"
    make_tree(tree, files=40)
    result = run_client(server, "--json", tree, timeout=60)
    assert result.status == 0 and result.records()[1] == {"NEW": 40}
    assert server.events("sidecar.repair")
    assert md5sum_check(sidecars_under(tree)) == []


def test_a_file_that_kills_every_worker_becomes_an_error_not_a_loop(start_server, tmp_path):
    # Ready: the workers start; each dies on its first file.  The back-off
    # after each death is cut to a tenth: the count of deaths is the point.
    server = start_server("--chaos", "crash:1.0", "--backoff-scale", "0.1")
    tree = tmp_path / "tree"
    make_tree(tree, files=6)
    result = run_client(server, "--json", tree, timeout=60)
    records, summary = result.records()
    assert summary == {"ERROR": 6}
    assert all("died or hung reading it" in r["error"] for r in records.values())
    assert len(server.events("file.abandoned")) == 6
    assert server.proc.poll() is None


def test_one_worker_cannot_turn_a_checked_file_into_an_error_alone(server, tmp_path):
    conn = Connection(server.fifo)
    conn.open()
    gone = str(tmp_path / "gone")
    try:
        conn.send(protocol.request(1, [protocol.check_item(gone, gone + ".md5", None,
                                                           "0" * 32)]))
        frame = next(conn.frames())
    finally:
        conn.close()
    assert frame["replies"][0]["status"] == "ERROR"
    second = [e for e in server.events("crosscheck") if e["path"] == gone]
    assert [e.get("first") for e in second] == ["ERROR"], "a second worker had to agree"


def test_ctrl_c_stops_the_client_at_once(start_server, tmp_path):
    server = start_server("--chaos", "hang:1.0", "--hang-timeout", "60")
    tree = tmp_path / "tree"
    make_tree(tree, files=20)
    client = subprocess.Popen([sys.executable, CLIENT, "--fifo", server.fifo, str(tree)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: server.events("session.opened"), what="the session")
    client.send_signal(signal.SIGINT)
    assert client.wait(5) == 130


def test_idle_sessions_are_dropped_and_status_always_gets_in(start_server, tmp_path):
    import json
    # Idle sessions must outlast what comes before the refused client, also
    # on a busy machine: 3s once ran out before it came.
    server = start_server("--idle-timeout", "10")
    idle = []
    try:
        for _ in range(100):                    # as many as the server takes
            conn = Connection(server.fifo)
            conn.open()                         # then send nothing
            idle.append(conn)
        status = run_client(server, "--status", "--json")
        assert status.status == 0, status.stderr
        assert json.loads(status.stdout)["clients"] == 100
        tree = tmp_path / "tree"
        make_tree(tree, files=5)
        refused = run_client(server, tree)
        assert refused.status == 2
        assert "too many clients" in refused.stderr, refused.stderr
        # The idle ones themselves: the status client's and the refused one's
        # sessions end too, often first, and 101 drops may hold only 99 of them.
        wait_until(lambda: sum(e["reason"] == "idle for 10s"
                               for e in server.events("session.dropped")) >= 100,
                   timeout=30, what="100 idle sessions dropped")
        dropped = server.events("session.dropped")
        assert sum(e["reason"] == "idle for 10s" for e in dropped) == 100, dropped
        assert run_client(server, tree).status == 0
    finally:
        for conn in idle:
            conn.close()


@pytest.fixture
def full_disk(tmp_path):
    """A directory on a 64 KiB tmpfs, filled up; unmounted afterwards."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k",
                                            "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("needs root to mount a tmpfs")
    try:
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"x" * 4096):
                pass
        except OSError:                 # ENOSPC: full
            pass
        finally:
            os.close(fd)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_full_log_file_system_never_makes_the_server_fail(full_disk, start_server, tmp_path):
    server = start_server("--log-dir", str(full_disk / "logs"))
    still_serves(server, tmp_path)
    assert server.stop() == 0, server.stderr_text()
    assert "Traceback" not in server.stderr_text()
    assert "event=server.stopped" in server.stderr_text().splitlines()[-1]
