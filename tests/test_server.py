"""The server as a process: its workers, signals, entrance and clients."""

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time

import psutil
import pytest

from helpers import (
    CLIENT,
    ROOT,
    SERVER,
    make_tree,
    md5sum_check,
    run_client,
    sidecars_under,
    wait_out_racy_window,
    wait_until,
)
from osproject import protocol

pytestmark = pytest.mark.timeout(60)
HELLO = b'{"hello":%d,' % protocol.HELLO_VERSION     # the start of a hello of this release


def fd_targets(pid):
    """{fd: what it points to}, read from /proc."""
    base = f"/proc/{pid}/fd"
    return {int(fd): os.readlink(os.path.join(base, fd)) for fd in os.listdir(base)}


def wait_all_ready(server, workers=5):
    """Wait until every worker has said ready (idle, in --status): past its
    fork, and past everything it set up for itself after it."""
    wait_until(lambda: [w["state"] for w in json.loads(check_status(server, "--json"))
                        ["workers"]] == ["idle"] * workers, what=f"{workers} workers ready")


def test_five_workers_each_on_its_own_pipes(server):
    # Ready, each has closed what it inherited from the server (worker._sanitize).
    wait_all_ready(server)
    workers = server.workers()
    assert len(workers) == 5
    for w in workers:
        assert os.getpgid(w.pid) == w.pid, "a worker leads its own process group"
    forked = server.events("worker.forked")
    assert sorted(int(e["slot"]) for e in forked) == [0, 1, 2, 3, 4]
    assert {int(e["pid"]) for e in forked} == {w.pid for w in workers}
    if not os.path.isdir(f"/proc/{server.proc.pid}/fd"):
        pytest.skip("fd check reads /proc (Linux)")
    server_fds = fd_targets(server.proc.pid)
    seen = set()
    for w in workers:
        fds = fd_targets(w.pid)
        assert fds[0] == fds[1] == "/dev/null"
        assert fds[2] == server_fds[2], "stderr is kept for a worker's last words"
        pipes = [t for fd, t in fds.items() if fd > 2]
        assert len(pipes) == 2 and all(t.startswith("pipe:") for t in pipes), fds
        assert not seen & set(pipes), "two workers share a pipe"
        seen |= set(pipes)
        assert set(pipes) <= set(server_fds.values()), "the server holds the other ends"


def test_a_killed_worker_is_reaped_and_replaced(server):
    victim = server.workers()[2]
    victim.send_signal(signal.SIGKILL)
    exited = server.wait_event("worker.exited")
    assert exited[0]["pid"] == str(victim.pid) and exited[0]["signal"] == "SIGKILL"
    workers = server.wait_workers(5)
    assert victim.pid not in {w.pid for w in workers}
    wait_until(lambda: not server.zombies(), what="no zombie")
    forks = server.events("worker.forked")
    assert len(forks) == 6 and forks[-1]["slot"] == exited[0]["slot"]


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH") or os.sched_getscheduler(0) != os.SCHED_OTHER,
                    reason="SCHED_BATCH is Linux's, and workers take it only from the "
                           "default policy, which these tests do not run under")
def test_workers_are_batch_tasks_and_the_server_is_not(server):
    # A worker woken by an assignment must not preempt the loop that wrote it.
    server.workers()[0].send_signal(signal.SIGKILL)
    forked = server.wait_event("worker.forked", count=6)[-1]    # a re-forked one too

    def batch_workers():
        """{pid: policy} of the five workers once all are SCHED_BATCH (each
        sets it itself, just after its fork), else None: polled."""
        try:
            found = {w.pid: os.sched_getscheduler(w.pid) for w in server.wait_workers(5)}
        except ProcessLookupError:      # one gone between the listing and the look
            return None
        return found if set(found.values()) == {os.SCHED_BATCH} else None
    found = wait_until(batch_workers, what="every worker SCHED_BATCH")
    assert int(forked["pid"]) in found
    assert os.sched_getscheduler(server.proc.pid) == os.sched_getscheduler(0)


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_a_server_run_under_another_policy_keeps_it_for_its_workers(start_server):
    # (From a review.)  `chrt -i` on the server made its workers batch tasks,
    # of normal weight, instead of idle ones.
    idle = ("import os, runpy, sys; os.sched_setscheduler(0, os.SCHED_IDLE, "
            "os.sched_param(0)); sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    server = start_server(command=[sys.executable, "-c", idle, SERVER])
    wait_all_ready(server)
    assert os.sched_getscheduler(server.proc.pid) == os.SCHED_IDLE
    assert {os.sched_getscheduler(w.pid) for w in server.wait_workers(5)} == {os.SCHED_IDLE}


def test_workers_killed_during_a_run_lose_no_file(server, tmp_path):
    tree = tmp_path / "tree"
    files = make_tree(tree, files=1500, dirs=30, size=20_000)
    client = subprocess.Popen([sys.executable, CLIENT, "--fifo", server.fifo, "--json",
                               str(tree)], stdout=subprocess.PIPE, text=True)
    kills = 0
    while client.poll() is None and kills < 10:
        busy = server.workers()
        if busy:
            busy[kills % len(busy)].send_signal(signal.SIGKILL)
            kills += 1
        # wait_until calls it at once: the loop cannot move `kills` under it
        wait_until(lambda: len(server.events("worker.forked")) >= 5 + kills  # noqa: B023
                   or client.poll() is not None, what="a re-fork")
    out, _ = client.communicate(timeout=90)
    assert client.returncode == 0, out[-2000:]
    lines = out.splitlines()
    assert json.loads(lines[-1])["summary"] == {"NEW": 1500 + 30 + 1}   # files, dirs, root
    assert len(lines) == 1 + 1500 + 30 + 1, "every entry exactly one result"
    sidecars = sidecars_under(tree)
    assert len(sidecars) == len(files)
    assert md5sum_check(sidecars) == []
    assert not [n for n in os.listdir(tree / "d0") if n.endswith(".tmp")]
    server.wait_workers(5)
    wait_until(lambda: not server.zombies(), what="no zombie")


def test_sigterm_stops_workers_removes_fifo_and_exits_0(start_server):
    server = start_server()
    workers = server.workers()
    assert server.stop() == 0
    assert not os.path.exists(server.fifo)
    gone, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive
    names = [e["event"] for e in server.events()]
    assert names[-1] == "server.stopped" and names.count("worker.exited") == 5


def test_sigint_stops_too(start_server):
    server = start_server()
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(10) == 0
    assert not os.path.exists(server.fifo)


@pytest.mark.processes
def test_client_without_server_exits_2_and_says_how_to_start_one(tmp_path):
    started = time.monotonic()
    result = run_client(str(tmp_path / "no.fifo"), tmp_path, timeout=10)
    assert result.status == 2
    assert "integrity-server" in result.stderr and "start" in result.stderr
    assert time.monotonic() - started < 5


@pytest.mark.processes
def test_client_with_a_stale_fifo_and_no_server_exits_2(tmp_path):
    os.mkfifo(tmp_path / "stale.fifo", 0o600)
    result = run_client(str(tmp_path / "stale.fifo"), tmp_path, timeout=10)
    assert result.status == 2 and "no integrity-server" in result.stderr


@pytest.mark.parametrize("workers", ["600", "100000"])
def test_more_workers_than_select_can_watch_are_refused_at_once(start_server, tmp_path,
                                                               workers):
    from osproject.server.loop import FD_SETSIZE, MAX_WORKERS
    assert 100 < MAX_WORKERS < FD_SETSIZE // 2 < int(workers)
    server = start_server("--workers", workers,
                          "--chaos", f"stillborn:{tmp_path}",   # cheap forks, if any
                          fifo=str(tmp_path / "s.fifo"), ready=False)
    assert server.proc.wait(30) == 2
    assert f"--workers must be at most {MAX_WORKERS}: select()" in server.stderr_text()
    assert "Traceback" not in server.stderr_text()
    assert not os.path.exists(tmp_path / "s.fifo")


def test_client_bad_arguments_exit_2(server, tmp_path):
    # A server is there and serving: the 2 can only be the arguments' doing.
    missing = tmp_path / "does-not-exist"
    result = run_client(server, missing)
    assert result.status == 2
    assert f"integrity-client: {missing}: no such file or directory" in result.stderr
    assert server.events("session.opened") == [], "judged before asking the server"
    proc = subprocess.run([sys.executable, CLIENT], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "give at least one PATH" in proc.stderr


@pytest.mark.parametrize("kind", ["file", "symlink", "dir", "foreign-fifo"])
def test_server_refuses_a_fifo_path_that_is_not_its_own(start_server, tmp_path, kind):
    path = tmp_path / "entrance"
    target = tmp_path / "target"
    target.write_text("keep me")
    if kind == "file":
        path.write_text("keep me")
    elif kind == "symlink":
        path.symlink_to(target)
    elif kind == "dir":
        path.mkdir()
    else:
        os.mkfifo(path, 0o600)
        os.chown(path, 65534, 65534)
    before = os.lstat(path)
    server = start_server(fifo=str(path), ready=False)
    assert server.proc.wait(10) == 2
    assert "refusing" in server.stderr_text()
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode, after.st_mtime_ns) == \
        (before.st_ino, before.st_mode, before.st_mtime_ns)
    assert target.read_text() == "keep me"


def test_a_second_server_on_the_same_fifo_is_refused(server, start_server):
    second = start_server(fifo=server.fifo, ready=False)
    assert second.proc.wait(10) == 2 and "already serving" in second.stderr_text()
    assert stat.S_ISFIFO(os.stat(server.fifo).st_mode)


def test_server_reuses_the_fifo_of_a_server_killed_with_sigkill(start_server, tmp_path):
    first = start_server()
    workers = first.workers()
    first.proc.kill()
    first.proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, "workers must die with their server"
    assert os.path.exists(first.fifo)
    start_server(fifo=first.fifo)
    tree = tmp_path / "tree"
    make_tree(tree, files=5)
    assert run_client(first.fifo, tree).status == 0


def test_a_client_waiting_on_a_killed_server_fails_within_seconds(start_server, tmp_path):
    server = start_server("--chaos", "hang:1.0", "--hang-timeout", "60")
    tree = tmp_path / "tree"
    make_tree(tree, files=20)
    client = subprocess.Popen([sys.executable, CLIENT, "--fifo", server.fifo, str(tree)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: server.events("session.opened"), what="the session")
    server.proc.kill()
    out, err = client.communicate(timeout=10)
    assert client.returncode == 2
    # Failed for the server's death, whichever way the client first saw it.
    assert re.fullmatch("integrity-client: (the server closed the session before it "
                        "was done|the server went away|lost the server: .+)\n", err), err


def write_entrance(server, data):
    fd = os.open(server.fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_garbage_on_the_entrance_is_refused_and_the_next_client_served(server, tmp_path):
    # Planted where a client's FIFOs go, so the server looks at each of them.
    beside = server.dir / "osp-client-planted"
    beside.mkdir()
    victim = beside / "victim"
    victim.write_text("keep")
    os.mkfifo(beside / "fifo-of-ours")
    (beside / "link").symlink_to(beside / "fifo-of-ours")
    bogus = [b"\x00\xff random bytes\n", b"{}\n", b"not json at all\n",
             HELLO + b'"request":"/dev/null","reply":"/dev/null"}\n',
             HELLO + b'"request":"%s","reply":"%s"}\n' % (bytes(victim), bytes(victim)),
             HELLO + b'"request":"%s","reply":"%s"}\n'
             % (bytes(beside / "link"), bytes(beside / "link")),
             HELLO + b'"request":"%s","reply":"%s"}\n'
             % (bytes(beside / "fifo-of-ours"), bytes(beside / "fifo-of-ours")),
             # another release's hello is answered why: never through these
             b'{"hello":1,"request":"%s","reply":"%s"}\n' % (bytes(victim), bytes(victim)),
             b'{"hello":1,"request":"%s","reply":"%s"}\n'
             % (bytes(beside / "link"), bytes(beside / "link"))]
    for line in bogus:
        write_entrance(server, line)
    with open(server.fifo, "wb") as entrance:     # blocking: the server drains it
        entrance.write(b"A" * 2_500_000 + b"\n")   # 2.5 MB without a newline
    server.wait_event("request.refused", count=len(bogus) + 1)
    reasons = [e["reason"] for e in server.events("request.refused")]
    assert sum("beside the entrance" in r for r in reasons) == 1, reasons  # /dev/null
    assert victim.read_text() == "keep"
    assert server.ps.memory_info().rss < 200 * 1024 * 1024
    tree = tmp_path / "tree"
    make_tree(tree, files=5)
    assert run_client(server, tree).status == 0
    assert "session.opened" in [e["event"] for e in server.events()]


@pytest.mark.parametrize("garbage", [b"\x00\xff random bytes", b"A" * 3_000_000],
                         ids=["bytes", "megabytes"])
def test_a_partial_line_left_on_the_entrance_costs_the_next_client_nothing(
        server, tmp_path, garbage):
    with open(server.fifo, "wb") as entrance:     # blocking: the server drains it
        entrance.write(garbage)                    # no newline, then close
    tree = tmp_path / "tree"
    make_tree(tree, files=5)
    result = run_client(server, tree)
    assert result.status == 0, result.stderr
    assert len(server.events("session.opened")) == 1
    assert len(server.events("request.refused")) == 1, "the garbage, and nothing else"


def test_a_client_of_another_release_is_told_why_it_is_not_served(server, tmp_path):
    """An old client after an upgrade: its hello is answered with the reason,
    not left to time out.  (A new client before a 0.2.0 server's restart still
    times out: that server refuses without a word.)"""
    mine = server.dir / "osp-client-old"
    mine.mkdir()
    for name in ("request", "reply"):
        os.mkfifo(mine / name, 0o600)
    reply = os.open(mine / "reply", os.O_RDONLY | os.O_NONBLOCK)
    try:
        write_entrance(server, b'{"hello":1,"request":"%s","reply":"%s"}\n'
                       % (bytes(mine / "request"), bytes(mine / "reply")))
        [refused] = server.wait_event("request.refused")
        assert "protocol version 1" in refused["reason"], refused
        def answer():
            try:
                return os.read(reply, 4096)
            except BlockingIOError:
                return None
        said = wait_until(answer, what="the server's answer")
        assert json.loads(said)["error"].startswith(
            f"this client speaks protocol version 1, the server {protocol.HELLO_VERSION}")
        assert "restart the server" in json.loads(said)["error"]
    finally:
        os.close(reply)
    assert "session.opened" not in [e["event"] for e in server.events()]
    tree = tmp_path / "tree"
    make_tree(tree, files=3)
    assert run_client(server, tree).status == 0


def test_fifos_anywhere_but_beside_the_entrance_are_never_looked_at(server, tmp_path):
    # Proper FIFOs of ours, with a client's directory name, in the wrong place:
    # the server must refuse them by their names, before any lstat or open.
    elsewhere = tmp_path / "elsewhere" / "osp-client-x"
    elsewhere.mkdir(parents=True)
    for name in ("request", "reply"):
        os.mkfifo(elsewhere / name)
    escape = f"{server.dir}/osp-client-x/../../elsewhere/osp-client-x"
    for directory in (str(elsewhere), escape):
        write_entrance(server, HELLO + b'"request":"%s/request","reply":"%s/reply"}\n'
                       % (directory.encode(), directory.encode()))
    refusals = server.wait_event("request.refused", count=2)
    assert all("beside the entrance" in e["reason"] for e in refusals), refusals
    assert "session.opened" not in [e["event"] for e in server.events()]


def test_an_idle_server_uses_no_cpu(server):
    before = server.ps.cpu_times()
    children = sum(c.cpu_times().user + c.cpu_times().system for c in server.workers())
    time.sleep(1.0)   # measuring idleness: the one place a fixed interval is the point
    after = server.ps.cpu_times()
    spent = (after.user + after.system) - (before.user + before.system)
    assert spent < 0.05, f"idle server burned {spent:.3f}s of CPU in 1s"
    assert sum(c.cpu_times().user + c.cpu_times().system
               for c in server.workers()) - children < 0.05


def test_a_client_that_dies_mid_run_costs_nothing_to_others(server, tmp_path):
    tree = tmp_path / "tree"
    make_tree(tree, files=2000, size=4000)
    client = subprocess.Popen([sys.executable, CLIENT, "--fifo", server.fifo, str(tree)],
                              stdout=subprocess.DEVNULL)
    wait_until(lambda: server.events("session.opened"), what="the session")
    client.kill()
    client.wait()
    other = tmp_path / "other"
    make_tree(other, files=30, seed=3)
    assert run_client(server, other).status == 0
    wait_until(lambda: len(server.events("session.closed"))
               + len(server.events("session.dropped")) >= 2, what="both sessions ended")
    assert server.proc.poll() is None


def test_a_sigkilled_client_is_logged_as_dropped_not_as_a_normal_close(server, tmp_path):
    tree = tmp_path / "tree"
    make_tree(tree, files=3000, size=4000)
    client = subprocess.Popen([sys.executable, CLIENT, "--fifo", server.fifo, str(tree)],
                              stdout=subprocess.DEVNULL)
    wait_until(lambda: len(sidecars_under(tree)) >= 100, what="the run under way")
    client.kill()
    client.wait()
    [dropped] = server.wait_event("session.dropped")
    assert dropped["reason"] == "client vanished: its reply FIFO is closed"
    assert int(dropped["files"]) >= 100 and int(dropped["new"]) >= 1
    assert server.events("session.closed") == []


def test_sighup_reopens_the_log(server):
    os.rename(server.log_path, server.log_path + ".1")
    server.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: os.path.exists(server.log_path), what="a new log file")
    assert server.wait_event("log.reopened")


def test_status_shows_workers_their_usage_and_the_totals(start_server, tmp_path):
    server = start_server("--chaos", "liar:2")
    tree = tmp_path / "tree"
    make_tree(tree, files=60)
    run_client(server, tree)
    # On a first run a lie needs a proof that may take more readings than 60
    # files give; against the baselines, the next runs prove it at once.
    wait_until(lambda: server.events("worker.banned") or run_client(server, tree) and False,
               timeout=60, what="the liar's ban")
    server.wait_workers()
    status = json.loads(check_status(server, "--json"))
    assert status["pid"] == server.proc.pid
    assert 0 < status["uptime"] <= time.time() - server.ps.create_time() + 1
    workers = {w["slot"]: w for w in status["workers"]}
    assert sorted(workers) == [0, 1, 2, 3, 4]
    assert {w["pid"] for w in workers.values()} == {p.pid for p in server.workers()}
    for w in workers.values():
        assert_usage_of(w, psutil.Process(w["pid"]))
        assert w["state"] == "idle" and w["warnings"] == 0
    assert_usage_of(status, server.ps)
    assert workers[2]["forks"] == 2, "the liar in slot 2 was banned and replaced"
    totals = status["totals"]
    assert totals == {"files": totals["files"], **totals_in_the_log(server)}
    assert totals["bans"] == 1 and totals["warnings"] >= 3
    # Every file read once, and once more for every second opinion asked for.
    assert totals["files"] >= 60 + len(server.events("crosscheck"))


def test_status_table_has_aligned_columns_and_a_totals_line(start_server, tmp_path):
    server = start_server()
    tree = tmp_path / "tree"
    make_tree(tree, files=20)
    run_client(server, tree)
    lines = check_status(server).splitlines()
    assert lines[0].startswith(f"integrity-server pid {server.proc.pid}, uptime 0:00:")
    header, rows = lines[1], lines[2:7]
    assert header.split() == ["SLOT", "STATE", "PID", "UPTIME", "FILES", "WARNINGS",
                              "RSS", "CPU", "FORKS"]
    starts = [header.index(name) for name in header.split()]
    for row in rows:
        assert [row.index(cell, start) for cell, start in zip(row.split(), starts, strict=False)] \
            == starts, f"not aligned with the header:\n{header}\n{row}"
    assert {int(row.split()[2]) for row in rows} == {p.pid for p in server.workers()}
    assert sum(int(row.split()[4]) for row in rows) >= 20
    assert lines[7].startswith("totals: ") and len(lines) == 8


def check_status(server, *args):
    """Run integrity-client --status; return its output, which must be a success."""
    result = run_client(server, "--status", *args)
    assert result.status == 0, result.stderr
    return result.stdout


def assert_usage_of(row, proc):
    """The RSS and CPU a status row reports are those psutil sees, give or take."""
    cpu = proc.cpu_times()
    assert 0 <= row["cpu"] <= cpu.user + cpu.system + 0.01
    assert 0.5 < row["rss"] / proc.memory_info().rss < 2


def totals_in_the_log(server):
    """The totals --status should report, but files, counted from the event log."""
    return {"warnings": len(server.events("worker.warned")),
            "bans": len(server.events("worker.banned")),
            "reforks": sum(1 for e in server.events("worker.forked") if e.get("restart"))}


def test_default_entrance_is_private_and_found_by_the_client(start_server, tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if k != "INTEGRITY_FIFO"}
    env["XDG_RUNTIME_DIR"] = str(runtime)
    fifo = runtime / "osproject" / "server.fifo"
    server = start_server(env=env, fifo=str(fifo), fifo_option=False)   # no --fifo
    assert stat.S_IMODE(os.stat(runtime / "osproject").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(fifo).st_mode) == 0o600
    tree = tmp_path / "tree"
    make_tree(tree, files=3)
    client = subprocess.run([sys.executable, CLIENT, str(tree)], env=env,
                            capture_output=True, text=True, timeout=30)
    assert client.returncode == 0, client.stderr
    assert server.stop() == 0
    assert not fifo.exists()


def test_a_client_that_names_the_entrance_through_a_symlink_is_served(server, tmp_path):
    (tmp_path / "via").symlink_to(server.dir)
    tree = tmp_path / "tree"
    make_tree(tree, files=3)
    result = run_client(str(tmp_path / "via" / "server.fifo"), tree)
    assert result.status == 0, result.stderr


def plant_client_dirs(where):
    """Directories named like a client's that the sweep must leave alone, aged
    an hour; return (them, a reader fd that keeps one 'alive' to close)."""
    keep = {}
    for name in ("alive", "other-uid", "not-only-fifos", "young"):
        keep[name] = where / f"osp-client-{name}"
        keep[name].mkdir()
        os.mkfifo(keep[name] / "reply")
    reader = os.open(keep["alive"] / "reply", os.O_RDONLY | os.O_NONBLOCK)
    (keep["not-only-fifos"] / "notes").write_text("a user's file")
    target = where.parent / f"{where.name}-elsewhere"
    target.mkdir()
    os.mkfifo(target / "reply")
    keep["link"] = where / "osp-client-link"
    keep["link"].symlink_to(target)
    if os.geteuid() == 0:
        os.chown(keep["other-uid"] / "reply", 12345, 12345)
        os.chown(keep["other-uid"], 12345, 12345)
    else:
        del keep["other-uid"]
    hour_ago = time.time() - 3600
    for name, path in keep.items():
        if name != "young":
            os.utime(path, (hour_ago, hour_ago), follow_symlinks=False)
    return keep, reader


def test_a_client_killed_in_its_handshake_leaves_nothing_for_long(server, tmp_path):
    keep, reader = plant_client_dirs(server.dir)
    try:
        server.proc.send_signal(signal.SIGSTOP)       # its hello waits unanswered
        try:
            client = subprocess.Popen([sys.executable, CLIENT, "--fifo", server.fifo,
                                       str(tmp_path)], stderr=subprocess.DEVNULL)
            mine = wait_until(lambda: [d for d in server.dir.glob("osp-client-*")
                                       if d not in keep.values()
                                       and sorted(os.listdir(d)) == ["reply", "request"]],
                              what="the client's FIFOs")
            client.kill()
            client.wait()
        finally:
            server.proc.send_signal(signal.SIGCONT)
        hour_ago = time.time() - 3600
        os.utime(mine[0], (hour_ago, hour_ago))        # as if it died long ago
        swept = server.wait_event("entrance.swept", timeout=30)
        assert swept[0]["dirs"] == "1"
        assert not mine[0].exists()
        assert all(os.path.lexists(p) for p in keep.values())
        assert os.listdir(keep["link"]) == ["reply"], "the link's target is untouched"
    finally:
        os.close(reader)


def test_litter_of_dead_clients_is_swept_when_the_server_starts(start_server, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    litter = run / "osp-client-dead"
    litter.mkdir()
    for name in ("request", "reply"):
        os.mkfifo(litter / name)
    hour_ago = time.time() - 3600
    os.utime(litter, (hour_ago, hour_ago))
    server = start_server(fifo=str(run / "server.fifo"))
    server.wait_event("worker.forked")      # the log is written once a loop pass
    names = [e["event"] for e in server.events()]
    assert names.index("entrance.swept") < names.index("worker.forked")
    assert not litter.exists()


def sparse_tree(root, files, size):
    """`files` files of `size` bytes that take no disk (all zeros), settled."""
    past = time.time() - 10
    paths = []
    for i in range(files):
        path = root / f"d{i % 10}" / f"big{i}"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(size)
        os.utime(path, (past, past))
        paths.append(path)
    wait_out_racy_window(paths)
    return paths


def test_a_one_file_client_is_served_between_another_clients_big_files(server, tmp_path):
    big = tmp_path / "big"
    # One file per assignment; 20 to get going and MAX_OUTSTANDING (100) more
    # in the server when the one file comes: the rest would be hashed for naught.
    sparse_tree(big, files=120, size=8 << 20)
    hog = subprocess.Popen([sys.executable, CLIENT, "--fifo", server.fifo, str(big)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def waiting():
        status = run_client(server, "--status", "--json")
        return json.loads(status.stdout)["waiting"]

    try:
        wait_until(lambda: len(sidecars_under(big)) >= 20, what="the big run")
        # Freeze the workers, the big run's files waiting in line; count how
        # many of them are done by the time the one-file client is.
        workers = server.workers()
        for w in workers:
            w.suspend()
        try:
            polls = [waiting()]
            wait_until(lambda: polls.append(waiting()) or polls[-1] == polls[-2],
                       what="the big run to stop asking")
            before = len(sidecars_under(big))
            small = tmp_path / "small"
            make_tree(small, files=1)
            one = subprocess.Popen([sys.executable, CLIENT, "--fifo", server.fifo,
                                    str(small)], stderr=subprocess.PIPE, text=True)
            wait_until(lambda: waiting() == polls[-1] + 1, what="the one file in line")
        finally:
            for w in workers:
                w.resume()
        wait_until(lambda: sidecars_under(small), what="a worker for the one file")
        done_meanwhile = len(sidecars_under(big)) - before
        assert hog.poll() is None, "the big run was over: nothing was tested"
        assert one.wait(60) == 0, one.stderr.read()
        one.stderr.close()
        # Those the frozen workers held, one turn of the big run, and what
        # the others did meanwhile; one queue for all made the one file wait
        # for the ~70 files queued before it.
        assert done_meanwhile <= 3 * len(workers), f"{done_meanwhile} big files went first"
    finally:
        hog.wait(120)
        hog.stderr.close()
    assert hog.returncode == 0


def test_a_deleted_entrance_is_made_anew_and_serves_again(server, tmp_path):
    os.unlink(server.fifo)                          # as a tmp cleaner would
    server.wait_event("entrance.recreated", timeout=20)
    assert stat.S_ISFIFO(os.lstat(server.fifo).st_mode)
    tree = tmp_path / "tree"
    make_tree(tree, files=5)
    assert run_client(server, tree).status == 0
    assert server.stop() == 0
    assert not os.path.exists(server.fifo)


def test_an_entrance_replaced_by_something_else_stops_the_server_and_is_left_alone(
        server, tmp_path):
    os.unlink(server.fifo)
    with open(server.fifo, "w") as f:               # not ours to remove
        f.write("someone else's")
    try:
        assert server.proc.wait(20) == 1
        [failed] = server.events("server.failed")
        assert "was replaced" in failed["reason"]
        with open(server.fifo) as f:
            assert f.read() == "someone else's"
    finally:
        os.unlink(server.fifo)


def test_logs_an_operator_can_follow(start_server, tmp_path):
    server = start_server("--chaos", "liar:0")
    [started] = server.events("server.started")
    assert started["log"] == server.log_path
    tree = tmp_path / "tree"
    files = make_tree(tree, files=300, dirs=10)
    client = subprocess.Popen([sys.executable, CLIENT, "--fifo", server.fifo, "tree"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL)
    assert client.wait(90) == 0
    [opened] = server.events("session.opened")
    assert opened["pid"] == str(client.pid) and opened["uid"] == str(os.geteuid())
    [roots] = server.events("session.roots")
    assert roots["session"] == opened["session"] and roots["count"] == "1"
    assert json.loads(roots["roots"]) == [str(tree)]
    with open(files[7], "ab") as f:
        f.write(b"changed")
    assert run_client(server, tree).status == 1
    [changed] = server.events("file.changed")
    assert changed["path"] == files[7]
    assert changed["session"] == server.events("session.opened")[-1]["session"]
    about_workers = [e for e in server.events() if e["event"].startswith("worker.")
                     and e["event"] not in ("worker.spawn_failed", "worker.backoff")]
    assert server.events("worker.banned")
    assert all("slot" in e and "pid" in e for e in about_workers), \
        [e for e in about_workers if "slot" not in e or "pid" not in e]


def test_the_default_log_dir_is_logs_of_a_checkout_else_where_daemon_logs_belong(tmp_path):
    from osproject.server.cli import ROOT_LOG_DIR, default_log_dir
    assert default_log_dir(ROOT) == os.path.join(ROOT, "logs")
    installed = str(tmp_path / "site-packages")          # no setup.py beside it
    assert default_log_dir(installed, euid=0) == ROOT_LOG_DIR == "/var/log/osproject"
    assert default_log_dir(installed, euid=1000, environ={"XDG_STATE_HOME": "/s",
                                                          "HOME": "/h"}) == "/s/osproject"
    assert default_log_dir(installed, euid=1000, environ={"HOME": "/h"}) == \
        "/h/.local/state/osproject"
