"""Nothing lost, nothing hangs: crashes, frozen workers, storms, hostile files."""

import os
import pathlib
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading

import psutil
import pytest

from helpers import CLIENT, ROOT, make_tree, md5sum_check, run_client, sidecars_under, wait_until

pytestmark = pytest.mark.timeout(120)


def temp_files_under(root):
    return [os.path.join(d, n) for d, _, names in os.walk(root) for n in names
            if n.startswith(".osp-") and n.endswith(".tmp")]


def assert_complete(result, files, status="NEW"):
    """Every file exactly one result, with `status`; sidecars md5sum accepts."""
    assert result.status == 0, result.stderr[-2000:]
    records, summary = result.records()         # raises on a duplicate path
    assert summary == {status: len(files)}, summary
    assert set(records) == set(files)


# -- workers ------------------------------------------------------------------

# Alone: the kills come at a fixed rate, and on a machine busy with other
# tests the workers read slower, so that a file may see three of its readers
# killed and become an ERROR, as a poison file would (MAX_DEATHS).
@pytest.mark.alone
def test_workers_killed_many_times_a_second_lose_nothing(server, tmp_path):
    tree = tmp_path / "tree"
    files = make_tree(tree, files=4000, dirs=25, size=6000)
    stop = threading.Event()
    kills = []

    def killer():
        rng = random.Random(5)
        while not stop.wait(0.03):
            workers = server.workers()
            if workers:
                victim = rng.choice(workers)
                try:
                    victim.send_signal(signal.SIGKILL)
                    kills.append(victim.pid)
                except psutil.NoSuchProcess:
                    pass

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        result = run_client(server, "--json", tree)
    finally:
        stop.set()
        thread.join()
    assert len(kills) >= 10, "the run ended before the storm got going"
    assert_complete(result, files)
    assert md5sum_check(sidecars_under(tree)) == []
    assert temp_files_under(tree) == [], "a killed worker's temp file was left"
    server.wait_workers(5)
    wait_until(lambda: not server.zombies(), what="no zombie")
    assert server.events("assignment.requeued")


def test_sigterm_during_a_first_run_leaves_no_temp_sidecar(start_server, tmp_path):
    # Workers spend much of a first run creating temp files, so each SIGTERM
    # of the server, passed on to them, lands in or next to that.
    for attempt in range(3):
        server = start_server()
        tree = tmp_path / f"tree{attempt}"
        make_tree(tree, files=3000, dirs=100, size=100)
        client = subprocess.Popen([sys.executable, CLIENT, "--fifo", server.fifo,
                                   str(tree)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            # wait_until calls it at once: the loop cannot move `tree` under it
            wait_until(lambda: len(sidecars_under(tree)) >= 300,  # noqa: B023
                       interval=0.1, what="sidecars")          # each look walks 3000 files
            assert server.stop() == 0
        finally:
            client.wait(30)
        assert temp_files_under(tree) == [], f"run {attempt}"


def test_a_stopped_worker_is_hung_killed_and_replaced(start_server, tmp_path):
    server = start_server("--hang-timeout", "1")
    tree = tmp_path / "tree"
    files = make_tree(tree, files=600, size=20_000)
    victim = server.workers()[0]
    victim.suspend()                                   # SIGSTOP
    result = run_client(server, "--json", tree)
    assert_complete(result, files)
    hung = server.wait_event("worker.hung")
    assert hung[0]["pid"] == str(victim.pid)
    exited = [e for e in server.events("worker.exited") if e["pid"] == str(victim.pid)]
    assert exited and exited[0]["signal"] == "SIGKILL"
    server.wait_workers(5)
    assert victim.pid not in {w.pid for w in server.workers()}


def test_a_big_file_reports_progress_and_is_not_taken_for_a_hang(start_server, tmp_path):
    server = start_server("--hang-timeout", "1")
    big = tmp_path / "big"
    with open(big, "wb") as f:                         # sparse: no disk, slow to hash
        f.truncate(1024**3)
    os.utime(big, (0, 0))
    result = run_client(server, "--json", big, timeout=100)
    records, summary = result.records()
    assert summary == {"NEW": 1}, result.stdout
    real = subprocess.run(["md5sum", str(big)], capture_output=True, text=True).stdout
    assert records[str(big)]["md5"] == real.split()[0]
    assert server.events("worker.hung") == []


def test_hanging_workers_cost_time_not_files(start_server, tmp_path):
    # ~220 assignments at 5%: some hang for certain (all but 1 run in 10^4).
    server = start_server("--chaos", "hang:0.05", "--hang-timeout", "1")
    tree = tmp_path / "tree"
    files = make_tree(tree, files=800)
    result = run_client(server, "--json", tree)
    assert server.events("worker.hung")
    assert result.status == 0, result.stderr[-2000:]
    records, _ = result.records()
    assert set(records) == set(files)
    # A file that hangs three workers in a row, alone, is a poison file by
    # design; random hangs make one now and then, never more than a stray.
    abandoned = {e["path"] for e in server.events("file.abandoned")}
    assert {p for p, r in records.items() if r["status"] != "NEW"} == abandoned
    assert len(abandoned) <= 2, abandoned
    assert md5sum_check(sidecars_under(tree)) == []


def test_a_restart_storm_backs_off_and_recovers(start_server, tmp_path):
    cause = tmp_path / "cause"
    cause.write_text("workers die while this exists")
    server = start_server("--chaos", f"stillborn:{cause}", ready=False)
    wait_until(lambda: len(server.events("worker.backoff")) >= 10, what="back-off")
    forks = [e["ts"] for e in server.events("worker.forked")]
    per_second = {}
    for ts in forks:
        per_second[ts[:19]] = per_second.get(ts[:19], 0) + 1
    assert max(per_second.values()) <= 5, per_second
    assert server.proc.poll() is None, "gave up while workers could still start"
    cause.unlink()                                     # the cause goes away
    server.wait_workers(5, timeout=20)
    tree = tmp_path / "tree"
    files = make_tree(tree, files=30)
    assert_complete(run_client(server, "--json", tree), files)


def test_workers_that_cannot_start_at_all_stop_the_server_with_a_clear_error(
        start_server, tmp_path):
    cause = tmp_path / "cause"
    cause.write_text("forever")
    # The real give-up (GIVE_UP_AFTER deaths unborn in every slot), without
    # waiting out ~15s of real back-off and fork rate cap.
    server = start_server("--chaos", f"stillborn:{cause}", "--backoff-scale", "0.05",
                          ready=False)
    assert server.proc.wait(60) == 1
    assert "workers die before they can start" in server.stderr_text()
    assert server.events("server.failed")
    assert not os.path.exists(server.fifo)


def unused_uid():
    """A uid that no user has and no process runs as: its process count is ours."""
    import pwd
    taken = {p.info["uids"].real for p in psutil.process_iter(["uids"]) if p.info["uids"]}
    for uid in range(47000, 48000):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            if uid not in taken:
                return uid
    pytest.skip("no free uid")


@pytest.fixture
def foreign_home():
    """(uid, its directory, the Python it runs, our checkout copied there) for a
    server run as a uid of its own; all removed afterwards."""
    if os.geteuid() != 0 or shutil.which("prlimit") is None:
        pytest.skip("needs root (to change uid) and prlimit")
    uid = unused_uid()
    base = tempfile.mkdtemp(prefix="osp-uid-")
    try:
        os.chmod(base, 0o755)
        pkg = copy_checkout(base)
        python = interpreter_for(uid, pkg)
        if python is None:
            pytest.skip(f"no Python >= 3.11 is runnable by uid {uid}")
        home = pathlib.Path(base, "home")
        home.mkdir()
        os.chown(home, uid, uid)
        yield uid, home, python, pkg
    finally:
        shutil.rmtree(base)


def test_when_no_worker_can_be_forked_clients_are_told_and_the_server_exits_1(
        foreign_home, start_server):
    uid, home, python, pkg = foreign_home
    # RLIMIT_NPROC counts every process of the uid: at 1 the server is the
    # only one it may have, and each fork fails with EAGAIN, as under a
    # systemd TasksMax= that is used up.  Half the real back-off: the server
    # gives up some 5s after its first failed fork, time enough for the
    # client to come and be told.
    server = start_server("--backoff-scale", "0.5", base=home, user=uid, ready=False,
                          command=["prlimit", "--nproc=1", python,
                                   os.path.join(pkg, "bin", "integrity-server")])
    assert server.wait_event("worker.spawn_failed")[0]["reason"] == \
        "Resource temporarily unavailable"
    tree = home / "tree"
    make_tree(tree, files=3)
    env = dict(os.environ, HOME=str(home), XDG_STATE_HOME=str(home / "state"))
    env.pop("INTEGRITY_CATALOG", None)             # the test's own is root's
    client = subprocess.run([python, os.path.join(pkg, "bin", "integrity-client"),
                             "--fifo", server.fifo, str(tree)],
                            user=uid, group=uid, extra_groups=[], env=env,
                            capture_output=True, text=True, timeout=60)
    assert client.returncode == 2, client.stderr
    assert "no worker" in client.stderr and "Traceback" not in client.stderr
    assert server.proc.wait(60) == 1
    [failed] = server.events("server.failed")
    assert failed["reason"] == "no worker can be forked: Resource temporarily unavailable"
    assert not os.path.exists(server.fifo)


def test_a_garbling_worker_is_killed_and_its_work_redone(start_server, tmp_path):
    server = start_server("--chaos", "garble:0.08")
    tree = tmp_path / "tree"
    files = make_tree(tree, files=800)
    result = run_client(server, "--json", tree)
    assert_complete(result, files)
    faulty = server.events("worker.faulty")
    assert faulty
    reasons = {e["reason"] for e in faulty}
    assert reasons <= {"not a frame: too long, or a field not ended",     # oversized
                       "unexpected frame in state BUSY",                  # random bytes
                       "answer does not match its assignment"}, reasons   # a result too many
    assert md5sum_check(sidecars_under(tree)) == []


def test_killing_a_process_group_takes_a_workers_children_with_it():
    from osproject.server.supervisor import kill_group
    parent = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60; wait"],
                              process_group=0)
    kids = wait_until(lambda: psutil.Process(parent.pid).children(), what="children")
    kill_group(parent.pid, signal.SIGKILL)
    parent.wait(5)
    gone, alive = psutil.wait_procs(kids, timeout=5)
    assert not alive


# -- hostile files -------------------------------------------------------------

def test_devices_and_fifos_are_never_read(server, tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    os.mknod(tree / "zero", stat.S_IFCHR | 0o600, os.makedev(1, 5))
    os.mkfifo(tree / "pipe")
    (tree / "file").write_text("x")
    records, summary = run_client(server, "--json", tree, timeout=20).records(
        every_entry=True)
    assert summary == {"NEW": 4}                   # tracked, with the root
    assert records[str(tree / "zero")]["kind"] == "chardev"
    assert "md5" not in records[str(tree / "zero")] and "md5" not in records[str(tree / "pipe")]


def test_hash_file_never_blocks_or_follows(tmp_path):
    from osproject.server.worker import hash_file
    os.mkfifo(tmp_path / "fifo")                       # no writer: a read would block
    (tmp_path / "link").symlink_to("/dev/zero")
    assert hash_file(str(tmp_path / "fifo")) == {"skipped": "FIFO"}
    assert hash_file(str(tmp_path / "link")) == {"skipped": "symbolic link"}
    assert hash_file("/dev/zero") == {"skipped": "character device"}
    assert hash_file(str(tmp_path / "gone"))["error"] == "No such file or directory"


def test_a_file_swapped_while_read_is_unstable(tmp_path):
    from osproject.server.worker import hash_file
    path = tmp_path / "f"
    path.write_bytes(b"a" * 1_000_000)
    other = tmp_path / "g"
    other.write_bytes(b"b")

    def swap():
        if other.exists():
            os.rename(other, path)                     # replaced under the reader
    result = hash_file(str(path), progress=swap)
    # Its old inode lost its name, which changed its ctime too.
    assert result["unstable"] in ("replaced while it was read", "changed while it was read")


def test_a_file_written_while_read_is_unstable(tmp_path):
    from osproject.server.worker import hash_file
    path = tmp_path / "f"
    path.write_bytes(b"a" * 1_000_000)
    def append():
        with open(path, "ab") as f:
            f.write(b"b")
    result = hash_file(str(path), progress=append)
    assert result["unstable"] == "changed while it was read"
    assert hash_file(str(path)).get("unstable") is None, "still, it is stable"


def test_names_too_long_and_paths_too_deep_are_errors_not_omissions(server, tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / ("n" * 252)).write_text("its .md5 would exceed NAME_MAX")
    (tree / "neighbour").write_text("fine")
    deep = os.open(tree, os.O_RDONLY)
    depth = 0
    while depth * 201 < 4300:                          # deeper than PATH_MAX
        os.mkdir("d" * 200, dir_fd=deep)
        inner = os.open("d" * 200, os.O_RDONLY, dir_fd=deep)
        os.close(deep)
        deep, depth = inner, depth + 1
    with open(os.open("deep-file", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=deep), "w") as f:
        f.write("far down")
    os.close(deep)
    try:
        result = run_client(server, "--json", tree)
        records, summary = result.records(every_entry=True)
        assert records[str(tree / "neighbour")]["status"] == "NEW"
        long = records[str(tree / ("n" * 252))]
        assert long["status"] == "ERROR" and "name too long" in long["error"].lower()
        errors = [r for r in records.values() if r["status"] == "ERROR"]
        assert len(errors) == 2, errors                # the long name, the deep dir
        assert any("name too long" in r["error"].lower() for r in errors
                   if r is not long)
    finally:
        subprocess.run(["rm", "-rf", str(tree)], check=True)  # rm copes with the depth


def test_planted_sidecar_links_never_write_elsewhere(server, tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    forged = tmp_path / "forged"                       # a valid line, hard-linked in
    (tree / "a").write_text("a")
    (tree / "b").write_text("b")
    (tree / "a.md5").symlink_to(victim)
    forged.write_bytes(b"0" * 32 + b"  b\n")
    os.link(forged, tree / "b.md5")
    result = run_client(server, "--json", "--update", tree)
    records, _ = result.records(every_entry=True)
    assert records[str(tree / "a")]["status"] == "NEW"       # no sidecar: its name is taken
    assert records[str(tree / "a.md5")]["kind"] == "symlink"  # tracked, never followed
    assert records[str(tree / "b")]["status"] == "CHANGED"
    assert victim.read_bytes() == b"precious\n"
    assert forged.read_bytes() == b"0" * 32 + b"  b\n", "written through a hard link"
    assert os.stat(tree / "b.md5").st_ino != os.stat(forged).st_ino
    assert md5sum_check([str(tree / "b.md5")]) == []


CHURN = r"""
import os, sys, time
root, seconds = sys.argv[1], float(sys.argv[2])
end, i = time.monotonic() + seconds, 0
names = sorted(os.listdir(root))
while time.monotonic() < end:
    i += 1
    path = os.path.join(root, names[i % len(names)])
    try:
        op = i % 4
        if op == 0:
            os.unlink(path)
        elif op == 1:
            with open(path + ".new", "wb") as f:
                f.write(os.urandom(5000))
            os.replace(path + ".new", path)            # swapped for another inode
        elif op == 2:
            with open(path, "ab") as f:                # growing while read
                f.write(os.urandom(100000))
        else:
            with open(path, "wb") as f:
                f.write(b"back")
    except OSError:
        pass
"""


def test_a_tree_churning_under_the_run_costs_neither_files_nor_the_server(server, tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(300):
        (tree / f"f{i:03}").write_bytes(os.urandom(50_000))
    churn = subprocess.Popen([sys.executable, "-c", CHURN, str(tree), "6"])
    try:
        for _ in range(3):
            result = run_client(server, "--json", tree)
            assert result.status in (0, 1), result.stderr
            records, summary = result.records()
            assert set(summary) <= {"NEW", "OK", "CHANGED", "MISSING", "UNSTABLE",
                                    "ERROR"}, summary
    finally:
        churn.kill()
        churn.wait()
    assert server.proc.poll() is None
    assert server.events("worker.warned") == []
    assert temp_files_under(tree) == []


# -- permissions, as another user ---------------------------------------------

def interpreter_for(uid, pythonpath):
    """A Python >= 3.11 that `uid` may run and that imports our package, or None."""
    for python in (sys.executable, "/usr/bin/python3", shutil.which("python3")):
        if not python:
            continue
        try:
            probe = subprocess.run(
                [python, "-c", "import sys, osproject; assert sys.version_info >= (3, 11)"],
                user=uid, group=uid, extra_groups=[], env={"PYTHONPATH": pythonpath},
                capture_output=True)
        except OSError:                                # not even executable for uid
            continue
        if probe.returncode == 0:
            return python
    return None


def copy_checkout(base):
    """Our package and launchers, readable by anyone wherever the checkout lives."""
    pkg = os.path.join(base, "pkg")
    shutil.copytree(os.path.join(ROOT, "osproject"), os.path.join(pkg, "osproject"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(ROOT, "bin"), os.path.join(pkg, "bin"))
    for directory, _dirs, files in os.walk(pkg):
        os.chmod(directory, 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o755)
    return pkg


NOBODY = 65534


@pytest.fixture
def nobodys_checkout():
    """(a directory anyone may enter, the Python uid 65534 runs, our checkout
    copied there); removed afterwards, after the servers started in it."""
    base = tempfile.mkdtemp(prefix="osp-perm-")
    try:
        os.chmod(base, 0o755)
        pkg = copy_checkout(base)
        python = interpreter_for(NOBODY, pkg)
        if python is None:
            pytest.skip("no Python >= 3.11 is runnable by uid 65534")
        yield base, python, pkg
    finally:
        shutil.rmtree(base)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another uid")
def test_permission_denied_is_an_error_and_the_run_goes_on(nobodys_checkout, start_server):
    base, python, pkg = nobodys_checkout
    tree = os.path.join(base, "tree")
    os.mkdir(tree)
    for name in ("open", "secret"):
        with open(os.path.join(tree, name), "w") as f:
            f.write(name)
    os.mkdir(os.path.join(tree, "closed"))
    for path in (tree, *(os.path.join(tree, n) for n in os.listdir(tree))):
        os.chown(path, NOBODY, NOBODY)
    os.chmod(os.path.join(tree, "secret"), 0)
    os.chmod(os.path.join(tree, "closed"), 0)
    private = os.path.join(base, "private")       # the FIFOs, the log, TMPDIR
    os.mkdir(private)
    os.chown(private, NOBODY, NOBODY)
    as_nobody = dict(user=NOBODY, group=NOBODY, extra_groups=[],
                     env={"PYTHONPATH": pkg, "TMPDIR": private,
                          "INTEGRITY_CATALOG": os.path.join(private, "catalog.sqlite")})
    server = start_server(base=pathlib.Path(private), user=NOBODY, env=as_nobody["env"],
                          command=[python, os.path.join(pkg, "bin", "integrity-server")])
    client = subprocess.run([python, os.path.join(pkg, "bin", "integrity-client"),
                             "--fifo", server.fifo, "--json", tree],
                            capture_output=True, text=True, timeout=60, **as_nobody)
    import json
    records = {r["path"]: r for r in map(json.loads, client.stdout.splitlines())
               if "path" in r}
    assert records[os.path.join(tree, "open")]["status"] == "NEW", client.stderr
    assert records[os.path.join(tree, "secret")]["status"] == "ERROR"
    assert records[os.path.join(tree, "secret")]["error"] == "Permission denied"
    assert "Permission denied" in records[os.path.join(tree, "closed")]["error"]
    assert client.returncode == 0


# -- clients -------------------------------------------------------------------

def test_a_client_that_never_reads_is_dropped_and_others_are_served(server, tmp_path):
    import hashlib
    import select
    import time

    from osproject import protocol
    from osproject.client.connection import Connection
    small = tmp_path / "small"
    small.write_bytes(b"tiny")
    item = protocol.check_item(str(small), str(small) + ".md5", None,
                               hashlib.md5(b"tiny").hexdigest())
    conn = Connection(server.fifo)
    conn.open()
    os.set_blocking(conn.request_fd, False)
    pending, rid, dropped = b"", 0, False
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and not dropped:
            if not pending:
                rid += 1
                pending = protocol.encode(protocol.request(rid, [item] * 5))
            try:
                pending = pending[os.write(conn.request_fd, pending):]
            except BlockingIOError:                    # the server stopped reading us
                select.select([], [conn.request_fd], [], 0.05)
                dropped = bool(server.events("session.dropped"))
            except BrokenPipeError:
                dropped = True
        assert dropped, "a client that never reads was never dropped"
        other = tmp_path / "other"
        files = make_tree(other, files=40)
        assert_complete(run_client(server, "--json", other), files)
    finally:
        conn.close()
    event = server.events("session.dropped")[0]
    assert "read nothing" in event["reason"]
    assert server.ps.memory_info().rss < 150 * 1024**2


def test_many_clients_at_once_are_all_served(server, tmp_path):
    trees = []
    for i in range(16):
        trees.append(tmp_path / f"t{i}")
        make_tree(trees[-1], files=40, seed=i)
    procs = [subprocess.Popen([sys.executable, CLIENT, "--fifo", server.fifo, str(t)],
                              stdout=subprocess.PIPE, text=True) for t in trees]
    for proc in procs:
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0 and out.endswith("46 entries: 46 NEW\n"), out
    assert len(server.events("session.closed")) == 16
