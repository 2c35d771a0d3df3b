"""--syslog: the event lines reach a real datagram socket, standing in for
/dev/log, with daemon priorities; a syslog that does not read never stalls
the server; no syslog at all is an error at start."""

import os
import re
import shutil
import socket
import tempfile

import pytest

from helpers import make_tree, parse_logfmt, run_client, wait_until
from osproject.server import log

pytestmark = pytest.mark.timeout(60)

DAEMON = {"info": 30, "warning": 28, "error": 27}      # facility 3 << 3 | severity
_DATAGRAM = re.compile(r"<(\d+)>integrity-server\[(\d+)\]: (.*)", re.S)


class Listener:
    """A bound AF_UNIX datagram socket: what syslogd holds at /dev/log."""

    def __init__(self):
        # sun_path holds 104 bytes on macOS: stay short, out of pytest's tmp_path.
        self.dir = tempfile.mkdtemp(prefix="osp-syslog-", dir="/tmp")
        self.path = os.path.join(self.dir, "log")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.received = []

    def drain(self):
        """Read every datagram waiting; return all received so far, parsed."""
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return self.received
            match = _DATAGRAM.fullmatch(data.decode())
            assert match, f"not <PRI>integrity-server[PID]: line: {data!r}"
            pri, pid, line = match.groups()
            self.received.append((int(pri), int(pid), line))

    def events(self):
        return [parse_logfmt(line)["event"] for _, _, line in self.drain()]

    def close(self):
        self.sock.close()
        shutil.rmtree(self.dir)


@pytest.fixture
def listener():
    sink = Listener()
    yield sink
    sink.close()


def log_lines(server):
    with open(server.log_path, encoding="utf-8") as f:
        return f.read().splitlines()


def test_syslog_gets_every_event_line_with_its_daemon_priority(start_server, listener,
                                                                tmp_path):
    server = start_server("--syslog-socket", listener.path)
    # Each phase waits for its lines: the socket queue (10 datagrams on Linux)
    # never fills, so nothing may be missing.
    wait_until(lambda: listener.events().count("worker.forked") == 5, what="startup")
    with open(server.fifo, "wb") as entrance:
        entrance.write(b"not a hello\n")
    wait_until(lambda: "request.refused" in listener.events(), what="the refusal")
    tree = tmp_path / "tree"
    make_tree(tree, files=5)
    assert run_client(server, tree).status == 0
    wait_until(lambda: "session.closed" in listener.events(), what="the session")
    assert server.stop() == 0
    received = listener.drain()
    assert [line for _, _, line in received] == log_lines(server)
    for pri, pid, line in received:
        assert pid == server.proc.pid
        assert pri == DAEMON[parse_logfmt(line)["level"]], line
    priorities = {parse_logfmt(line)["event"]: pri for pri, _, line in received}
    assert priorities["server.started"] == priorities["session.opened"] == 30
    assert priorities["request.refused"] == 28


def test_a_syslog_that_does_not_read_costs_lines_not_the_server(start_server, listener,
                                                                tmp_path):
    listener.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)   # fills fast
    server = start_server("--syslog-socket", listener.path)
    tree = tmp_path / "tree"
    make_tree(tree, files=100)
    assert run_client(server, tree).status == 0        # nobody reads the socket
    assert server.stop() == 0
    lines = log_lines(server)
    stopped = parse_logfmt(lines[-1])
    received = [line for _, _, line in listener.drain()]
    assert int(stopped["unsent"]) > 0
    # server.stopped counts the lines dropped before it; it may be dropped too.
    assert len(received) + int(stopped["unsent"]) + (lines[-1] not in received) \
        == len(lines)
    assert received == [line for line in lines if line in received], "order kept"


@pytest.mark.parametrize("kind", ["missing", "plain-file", "nobody-listens"])
def test_no_syslog_to_send_to_fails_at_start(listener, start_server, tmp_path, kind):
    listener.sock.close()                   # a daemon that died leaves its socket
    path = listener.path
    if kind != "nobody-listens":
        os.unlink(path)
    if kind == "plain-file":
        open(path, "w").close()
    fifo = tmp_path / "server.fifo"
    server = start_server("--syslog-socket", path, fifo=str(fifo), ready=False)
    assert server.proc.wait(10) == 2
    reason = {"missing": "No such file", "nobody-listens": "Connection refused"}
    assert f"--syslog: cannot send to {path}: {reason.get(kind, '')}" in server.stderr_text()
    assert not fifo.exists()


def test_no_syslog_socket_on_this_system_fails_with_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(log, "SYSLOG_SOCKETS", (str(tmp_path / "dev-log"),))
    with pytest.raises(log.SyslogError, match="no syslog socket .*dev-log"):
        log.Syslog()


def test_an_error_is_daemon_err(listener):
    sink = log.Syslog(listener.path)
    try:
        sink.send("error", "level=error event=worker.banned")
    finally:
        sink.close()
    assert listener.drain() == [(27, os.getpid(), "level=error event=worker.banned")]


def test_a_line_too_long_for_a_datagram_goes_cut_not_dropped(listener):
    sink = log.Syslog(listener.path)
    try:
        sink.send("info", "event=file.changed path=/" + "d" * 5000)
    finally:
        sink.close()
    [data] = [line for _, _, line in listener.drain()]
    assert data.startswith("event=file.changed path=/ddd")
    assert len(f"<30>integrity-server[{os.getpid()}]: {data}".encode()) == log.SYSLOG_MAX
    assert sink.dropped == 0
