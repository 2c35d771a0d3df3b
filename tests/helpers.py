"""What the tests share besides fixtures: paths, polling, trees, and the
server and client as processes.

Fixtures live in conftest.py; everything else a test, tests/bench.py or
tests/chaos_demo.py imports comes from here (`from helpers import ...`), so
that no module imports conftest, which pytest alone should load.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import psutil

from osproject.server.worker import RACY_COARSE_NS, RACY_FINE_NS, is_racy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(ROOT, "bin", "integrity-server")
CLIENT = os.path.join(ROOT, "bin", "integrity-client")
CLIENT_TIMEOUT = 90

# Every server the fixture starts carries this variable with a value of its
# own; its workers inherit it, so whatever it started can be found afterwards
# by that value alone, however many other tests run beside it.
TAG_VARIABLE = "OSPROJECT_TEST_SERVER"
OUTLIVE_GRACE = 5.0     # seconds a server's process may take to go after it stopped


def wait_until(predicate, timeout=10.0, interval=0.02, what="condition"):
    """Poll `predicate` until it returns something truthy; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


_PAIR = re.compile(r'(\w[\w.]*)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_logfmt(line):
    """Parse one logfmt line into a dict (quoted values unescaped)."""
    fields = {}
    for key, value in _PAIR.findall(line):
        if value.startswith('"'):
            value = value[1:-1].encode().decode("unicode_escape")
        fields[key] = value
    return fields


def temp_sidecars_of(pids, root):
    """Temp sidecars (.osp-PID-N.tmp) of the processes `pids` under root."""
    found = []
    for directory, _, names in os.walk(root):
        for name in names:
            match = re.fullmatch(r"\.osp-(\d+)-\d+\.tmp", name)
            if match and int(match.group(1)) in pids:
                found.append(os.path.join(directory, name))
    return found


def tagged_processes(tag):
    """Live processes whose environment carries TAG_VARIABLE=tag."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and \
                    proc.environ().get(TAG_VARIABLE) == tag:
                found.append(proc)
        except (psutil.Error, OSError):     # gone, or not ours to read
            pass
    return found


class ServerProcess:
    """A running integrity-server and what a test needs to look at it.

    `fifo_option=False` leaves --fifo out (the server finds its default
    entrance, `fifo` says where); `stderr="pipe"` gives it a pipe nobody
    reads instead of a file; `env` replaces the environment.
    """

    def __init__(self, directory, args=(), fifo=None, command=None, user=None, env=None,
                 fifo_option=True, stderr="file"):
        self.dir = directory
        self.dir.mkdir()
        as_user = {}
        if user is not None:                    # run it as another uid (we are root)
            os.chown(self.dir, user, user)
            as_user = dict(user=user, group=user, extra_groups=[])
        self.fifo = fifo or str(self.dir / "server.fifo")
        self.log_dir = str(self.dir / "logs")
        self.log_path = os.path.join(self.log_dir, "integrity-server.log")
        self.stderr = open(self.dir / "stderr", "w+")
        self.found = _identity(self.fifo)      # what was at the entrance path before it
        self.ready = False
        self.tag = uuid.uuid4().hex
        env = dict(os.environ if env is None else env, **{TAG_VARIABLE: self.tag})
        entrance = ["--fifo", self.fifo] if fifo_option else []
        self.proc = subprocess.Popen(
            [*(command or [sys.executable, SERVER]), *entrance, "--log-dir", self.log_dir,
             *args], stdout=subprocess.DEVNULL, env=env,
            stderr=subprocess.PIPE if stderr == "pipe" else self.stderr, **as_user)
        self.ps = psutil.Process(self.proc.pid)
        self.known = set()
        self._parsed_key, self._parsed_upto, self._parsed = None, 0, []

    def wait_ready(self, workers=5):
        wait_until(lambda: os.path.exists(self.fifo) or self.proc.poll() is not None,
                   what="the entrance FIFO")
        assert self.proc.poll() is None, self.stderr_text()
        self.wait_workers(workers)
        self.ready = True
        return self

    def children(self):
        try:
            return self.ps.children()
        except psutil.NoSuchProcess:
            return []

    def workers(self):
        """The live worker processes (not zombies), found with psutil."""
        alive = []
        for child in self.children():
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    alive.append(child)
            except psutil.NoSuchProcess:
                pass
        self.known.update(alive)
        return alive

    def zombies(self):
        result = []
        for child in self.children():
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    result.append(child)
            except psutil.NoSuchProcess:
                pass
        return result

    def wait_workers(self, count=5, timeout=15):
        """Wait until exactly `count` workers are running: forked and not yet
        reaped (a worker just forked may not have said ready yet)."""
        def settled():
            workers = self.workers()
            return len(workers) == count and workers
        return wait_until(settled, timeout, what=f"{count} workers")

    def events(self, name=None):
        """Logged events, parsed; only those called `name` if given.

        Polled often, so the log is read on from where the last call left
        it: the same file (by path and inode) grown, else read anew.
        """
        try:
            with open(self.log_path, "rb") as f:
                st = os.fstat(f.fileno())
                key = (self.log_path, st.st_dev, st.st_ino)
                if self._parsed_key != key or st.st_size < self._parsed_upto:
                    self._parsed_key, self._parsed_upto, self._parsed = key, 0, []
                f.seek(self._parsed_upto)
                data = f.read()
        except FileNotFoundError:
            return []
        complete = data[:data.rfind(b"\n") + 1]       # a line being written waits
        self._parsed_upto += len(complete)
        self._parsed += [parse_logfmt(line) for line in
                         complete.decode("utf-8").splitlines()]
        return [e for e in self._parsed if name is None or e.get("event") == name]

    def wait_event(self, name, count=1, timeout=15):
        return wait_until(lambda: len(self.events(name)) >= count and self.events(name),
                          timeout, what=f"{count} x event={name}")

    def stderr_text(self):
        self.stderr.seek(0)
        return self.stderr.read()

    def stop(self, timeout=10):
        """SIGTERM the server and wait; return its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("the server did not stop on SIGTERM") from None

    def cleanup(self):
        """Stop the server; fail if it or any worker it had outlives it."""
        self.workers()               # remember the last workers too
        try:
            status = self.stop() if self.proc.poll() is None else self.proc.returncode
        finally:
            if self.proc.stderr is not None:
                self.proc.stderr.close()
            self._reap_known()
        self.stderr.close()
        return status

    def _reap_known(self):
        """Nothing the server started may outlive it for long: the workers seen,
        and every process that carries its tag (those never seen too)."""
        leftovers = self.known | set(tagged_processes(self.tag))
        _, alive = psutil.wait_procs(leftovers, timeout=OUTLIVE_GRACE)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        if alive:
            raise AssertionError("outlived their server: " + ", ".join(
                f"pid {p.pid}" + (" (a worker)" if p in self.known else "") for p in alive))

    def killed(self):
        """Was the server SIGKILLed (so that it could not clean up)?"""
        return self.proc.returncode == -signal.SIGKILL

    def worker_pids(self):
        """Every worker it ever had: those seen, and those its log says it forked."""
        pids = {p.pid for p in self.known}
        return pids | {int(e["pid"]) for e in self.events("worker.forked") if "pid" in e}

    def leaks(self, roots):
        """What a stopped server left behind that it should not have: complaints."""
        if self.killed():
            return []                # a SIGKILL leaves the FIFO and temps by design
        problems = []
        # A server that served removes its entrance; one refused at start
        # leaves whatever was at the path as it was, and makes nothing there.
        if os.path.lexists(self.fifo) and (self.ready or _identity(self.fifo) != self.found):
            problems.append(f"the entrance FIFO {self.fifo} outlived its server")
        pids = self.worker_pids()
        for root in roots:
            for path in temp_sidecars_of(pids, root):
                problems.append(f"a worker's temp sidecar {path} outlived its server")
        return problems


def _identity(path):
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_mode


class ClientResult:
    def __init__(self, proc):
        self.status = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr

    def records(self, every_entry=False):
        """The --json output: (records by path, the count of each status).

        Regular files only, unless every_entry: most tests are about files,
        and the catalog also reports each directory, symlink and device.
        The summary line must count exactly the records printed.
        """
        objects = [json.loads(line) for line in self.stdout.splitlines()]
        assert objects and "summary" in objects[-1], self.stdout + self.stderr
        entries = {}
        for obj in objects[:-1]:
            assert obj["path"] not in entries, f"two results for {obj['path']}"
            entries[obj["path"]] = obj
        assert objects[-1]["summary"] == _counts(entries.values()), self.stdout
        if not every_entry:
            entries = {p: r for p, r in entries.items() if r.get("kind") in ("file", None)}
        return entries, _counts(entries.values())

    def statuses(self):
        files, _ = self.records()
        return {path: rec["status"] for path, rec in files.items()}


def _counts(records):
    counts = {}
    for record in records:
        counts[record["status"]] = counts.get(record["status"], 0) + 1
    return counts


def run_client(server_or_fifo, *args, timeout=CLIENT_TIMEOUT, env=None):
    fifo = getattr(server_or_fifo, "fifo", server_or_fifo)
    proc = subprocess.run([sys.executable, CLIENT, "--fifo", fifo, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env,
                          errors="surrogateescape")
    return ClientResult(proc)


def make_tree(root, files=50, dirs=5, size=2000, seed=0, age=10.0):
    """Write a tree of `files` regular files spread over `dirs` directories.

    Returns once the tree has settled like a real one nobody is writing to:
    mtimes dated `age` seconds back, and the last change older than the
    racy window (wait_out_racy_window).
    """
    paths = []
    past = time.time() - age
    for i in range(files):
        d = os.path.join(root, f"d{i % dirs}")
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"f{i}.dat")
        with open(path, "wb") as f:
            f.write(f"{seed}:{i}:".encode() * (size // 8 + i % 7))
        os.utime(path, (past, past))
        paths.append(path)
    wait_out_racy_window(paths)
    return paths


def wait_out_racy_window(paths):
    """Wait until no worker would judge any of `paths` racy (worker.is_racy).

    A reading that starts within a timestamp tick of a file's last change
    may be honest and still differ from another, so a disagreement on such
    a reading is never taken for a lie.  A tree the tests just wrote would
    be all racy: the trust tests would see lies go unpunished, and nothing
    would prove what they prove.  The mtimes can be dated back (os.utime),
    but not the ctime: utime itself sets it to now, and is_racy counts it.
    So this waits for the newest ctime to be RACY_FINE_NS old (100 ms), and
    longer only for a change stamped on a whole second, which is judged
    against the coarse window.  A worker's reading starts later still.
    """
    stats = [os.stat(p) for p in paths]
    newest = max((max(st.st_mtime_ns, st.st_ctime_ns) for st in stats), default=0)
    time.sleep(max(0, newest + RACY_FINE_NS - time.time_ns()) / 1e9)
    wait_until(lambda: not any(is_racy(st, time.time_ns()) for st in stats),
               timeout=RACY_COARSE_NS / 1e9 + 1, interval=0.01,
               what="the tree's last change to leave the racy window")


@contextlib.contextmanager
def workers_frozen(server):
    """SIGSTOP every worker for the block: the files wait, listed but unread."""
    workers = server.wait_workers()
    for w in workers:
        w.send_signal(signal.SIGSTOP)
    try:
        yield workers
    finally:
        for w in workers:
            w.send_signal(signal.SIGCONT)


def files_in(server):
    """Files the server holds: waiting for a worker, or with one (--status)."""
    status = json.loads(run_client(server, "--status", "--json").stdout)
    return status["waiting"] + status["inflight"]


def tamper(path, data=b"tampered"):
    """Alter a file the way an intruder or a careless edit would: append to it."""
    with open(path, "ab") as f:
        f.write(data)


def md5sum_check(sidecars):
    """Run the real `md5sum -c` on the sidecars, in their directories.

    Returns md5sum's complaints, empty when every sidecar checks out.
    """
    by_dir = {}
    for sidecar in sidecars:
        directory, name = os.path.split(os.fsencode(sidecar))
        by_dir.setdefault(directory, []).append(name)
    failures = []
    for directory, names in by_dir.items():
        proc = subprocess.run([b"md5sum", b"--quiet", b"-c", b"--", *names],
                              cwd=directory, capture_output=True)
        if proc.returncode != 0 or not names:
            failures.append((directory, proc.stdout + proc.stderr))
    return failures


def sidecars_under(root):
    """Every *.md5 file under root (bytes-safe)."""
    found = []
    for directory, _, names in os.walk(os.fsencode(root)):
        found += [os.path.join(directory, n) for n in names if n.endswith(b".md5")]
    return [os.fsdecode(p) for p in found]
