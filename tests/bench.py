"""`make bench`: how fast is osproject against plain tools, and how much memory does it use?

What is measured
  Wall-clock seconds of one `integrity-client` run against a private, already
  running `integrity-server` (5 workers), compared with a peer tool on the same
  tree, and the peak resident memory of the server, its workers and the client.

  L verify   8 files of 256 MiB, sidecars present.
             peer: find | xargs -0 -P2 -n1 md5sum.  Also: ours as a share of
             the machine's MD5 ceiling (`openssl speed -evp md5 -multi NPROC`,
             16384-byte column): ceiling = total bytes / openssl's rate.
  S verify   20,000 files of 1-16 KiB in 100 directories, sidecars present.
             peers: md5deep -r, find | xargs -0 -P2 -n500 md5sum, and a plain
             one-process Python verifier (`reference_verify` below: os.scandir
             walk, read each sidecar, hashlib.md5, compare).
  S create   the same tree with every *.md5 moved away before each run (ours and
             peer alike; moved, not unlinked: see Graveyard), so each run
             writes all the sidecars, and our catalog deleted too: a true
             first run, the catalog's first filling included.
             peer: a plain one-process Python reference (`reference_create`
             below: os.scandir walk, hashlib.md5, temp file + os.replace).
  RSS        peak RSS of the server, of its biggest worker, of server plus
             workers together, and of the client, sampled with psutil every
             50 ms from a thread of the bench while the client runs: once on
             the S tree (verify) and on the T tree, 200,000 files of 100 bytes
             in 1,000 directories (BENCH_TINY sets the count: 1000000 shows
             that RSS stays flat; one first run, then one verify run, each
             against a freshly started server).  server+workers adds up RSS,
             so pages the forked workers still share with the server count
             once per process: an upper bound.

How
  The corpora are built under one temp directory ($TMPDIR applies), one
  corpus at a time, and removed at the end even on Ctrl-C or SIGTERM.  Every
  corpus is read once to warm the page cache before anything is timed.  Ours
  and the peer then run alternately (ours, peer, ours, peer ...) BENCH_REPEAT
  times and the table shows the medians and peer/ours (> 1: we are faster).
  Each server is probed with a one-file check before timing, so worker
  start-up is never timed.

  Beside each wall ratio the table shows CPU seconds (user + system): ours
  per process, client / server / workers (the client's from wait4(2), the
  server's and its workers' from psutil, before and after the run), and
  the peer's (its reaped children, getrusage), each also in microseconds
  per file.  On a machine whose cores other work shares, CPU is the
  steadier measure; wall time is what the user waits.

  The client keeps a catalog of every entry it checked.  Each measured
  scenario has a catalog of its own in the temp directory (--catalog), never
  the user's: a verify (L, S, T) uses one filled by an untimed run of ours
  first; a first run (S create, T create) starts with none, catalog.sqlite
  and its -wal and -shm deleted untimed before each run.  A peer that is not
  installed is skipped (say so, go on); the bench never installs anything.

  A corpus the file system has no room for is skipped too (L needs about
  2.5 GiB at scale 1, T about 1.6 GiB: 400,000 inodes of 4 KiB).

Environment
  BENCH_SCALE=F   shrink (or grow) every corpus by F: the size of the 8 L files,
                  the number of S and T files and directories (default 1;
                  0.01 is a quick check)
  BENCH_REPEAT=N  runs of each side of a pair (default 3; the RSS runs are single)
  BENCH_TINY=N    files in the T corpus (default 200000, times BENCH_SCALE)

Exit status: 0, or 1 when ours failed: the client exited non-zero on a tree
nobody altered (2: it could not do its job; 1: it reported CHANGED or MISSING),
the server died, or a first run left files without a sidecar.  Being slower
than a peer is not a failure.
"""

import hashlib
import math
import os
import platform
import random
import re
import resource
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

try:
    import psutil
except ImportError:         # the RSS part is skipped, the timings still run
    psutil = None

KiB, MiB, GiB = 1024, 1024 ** 2, 1024 ** 3
THIS = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(THIS))
SERVER = os.path.join(REPO, "bin", "integrity-server")
CLIENT = os.path.join(REPO, "bin", "integrity-client")
SUFFIX = ".md5"
BLOCK = 4 * KiB             # disk space a small file really takes
SAMPLE_INTERVAL = 0.05      # seconds between RSS samples
READY_TIMEOUT = 10.0        # seconds a server gets to create its FIFO
STOP_TIMEOUT = 10.0         # seconds a server gets to exit after SIGTERM


class OursFailed(Exception):
    """Our server or client did not do its job; str() says how."""


def log(message):
    """Progress goes to stderr; stdout gets only the final report."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


# -- settings -----------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    scale: float
    repeat: int
    tiny: int = 200_000

    @classmethod
    def from_env(cls):
        try:
            scale = float(os.environ.get("BENCH_SCALE", "1"))
            repeat = int(os.environ.get("BENCH_REPEAT", "3"))
            tiny = int(os.environ.get("BENCH_TINY", "200000"))
        except ValueError as exc:
            raise SystemExit(f"bench: bad BENCH_SCALE, BENCH_REPEAT or BENCH_TINY: {exc}") \
                from None
        if not (math.isfinite(scale) and scale > 0) or repeat < 1 or tiny < 1:
            raise SystemExit("bench: BENCH_SCALE must be > 0, BENCH_REPEAT and BENCH_TINY "
                             ">= 1")
        return cls(scale, repeat, tiny)

    def count(self, full):
        """A count of files or directories at this scale, at least 1."""
        return max(1, round(full * self.scale))


# -- corpora ------------------------------------------------------------------

def build_large(root, count, size):
    """`count` files of `size` bytes: 1 MiB of urandom, varied per MiB."""
    os.makedirs(root)
    block = bytearray(os.urandom(MiB))
    view = memoryview(block)
    for i in range(count):
        with open(os.path.join(root, f"large{i}.bin"), "wb") as f:
            for offset in range(0, size, MiB):
                struct.pack_into("<QQ", block, 0, i, offset)     # no two MiB alike
                struct.pack_into("<QQ", block, MiB // 2, offset, i)
                f.write(view[:min(MiB, size - offset)])


def build_tree(root, files, dirs, min_size, max_size, seed):
    """`files` files of min..max bytes spread over `dirs` directories, two levels deep."""
    rng = random.Random(seed)
    pool = rng.randbytes(MiB)
    directories = [os.path.join(root, f"a{i // 10:03d}", f"b{i % 10}") for i in range(dirs)]
    for directory in directories:
        os.makedirs(directory)
    for i in range(files):
        size = rng.randint(min_size, max_size)
        start = rng.randrange(len(pool) - size)
        with open(os.path.join(directories[i % dirs], f"f{i:06d}.dat"), "wb") as f:
            f.write(pool[start:start + size])


def walk_files(root):
    """Yield the path of every regular file under root (scandir, no symlinks)."""
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            entries = list(it)
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            elif entry.is_file(follow_symlinks=False):
                yield entry.path


def warm_cache(root):
    """Read every file once so that no timed run waits for the disk."""
    buf = bytearray(MiB)
    for path in walk_files(root):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


class Graveyard:
    """Takes every sidecar out of a tree before a first run, without unlinking it.

    Unlinking is what a bench would do, and on ext4 it poisons the next runs:
    for a minute or more after an inode is freed, the allocator skips it
    (`recently_deleted()` in `find_inode_bit`) and scans on past it, so each
    create-delete round made every later file creation slower, both sides'
    alike (kernel time per run grew by half a second a round on 20,000 files,
    `perf` showed 60% of it in that scan).  A nightly first run on a real tree
    sees no such pile of freed inodes, so the old sidecars are renamed into a
    directory of their own and unlinked only at the end.
    """

    def __init__(self, work):
        self.dir = os.path.join(work, "graveyard")
        self.rounds = 0

    def bury_sidecars(self, root):
        self.rounds += 1
        grave = os.path.join(self.dir, str(self.rounds))
        os.makedirs(grave)
        for i, path in enumerate(p for p in walk_files(root) if p.endswith(SUFFIX)):
            os.rename(path, os.path.join(grave, str(i)))

    def clear(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def files_without_sidecar(root):
    """Return the data files under root that have no `<file>.md5` beside them."""
    paths = set(walk_files(root))
    return sorted(p for p in paths if not p.endswith(SUFFIX) and p + SUFFIX not in paths)


def catalog_path(work, name):
    """The catalog file of one scenario, in a directory of its own under work."""
    directory = os.path.join(work, "catalogs", name)
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, "catalog.sqlite")


def delete_catalog(path):
    """Remove a catalog and its WAL files, so that the next run of ours is a first one."""
    for name in (path, path + "-wal", path + "-shm"):
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass


def has_room(where, need_bytes, need_inodes):
    """Return None if the file system of `where` has the room, else why not."""
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    if free < need_bytes:
        return f"needs {fmt_bytes(need_bytes)} free in {where}, has {fmt_bytes(free)}"
    if st.f_files and st.f_favail < need_inodes:     # f_files 0: no inode limit
        return f"needs {need_inodes} free inodes in {where}, has {st.f_favail}"
    return None


def tree_footprint(files, dirs, max_size):
    """Disk bytes and inodes of a small-file tree once every file has a sidecar."""
    per_file = math.ceil(max_size / BLOCK) * BLOCK + BLOCK
    return files * per_file + dirs * BLOCK, 2 * files + dirs + dirs // 10 + 1


# -- ours ---------------------------------------------------------------------

class Server:
    """A private integrity-server: started, probed, stopped with SIGTERM and reaped."""

    def __init__(self, work, name):
        self.dir = os.path.join(work, f"server-{name}")
        os.makedirs(self.dir)
        self.fifo = os.path.join(self.dir, "server.fifo")
        self.stderr_path = os.path.join(self.dir, "stderr")
        self.proc = None
        self.last_cpu = None        # CPU seconds of the last run of ours, per process

    def __enter__(self):
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, SERVER, "--fifo", self.fifo,
             "--log-dir", os.path.join(self.dir, "logs")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr)
        try:
            self.wait_ready()
            self.probe()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        status = self.stop()
        if exc_type is None and status != 0:
            raise OursFailed(f"server exited with status {status} after SIGTERM"
                             + self.last_words())

    def wait_ready(self):
        """Poll until the FIFO exists; fail if the server dies or the deadline passes."""
        deadline = time.monotonic() + READY_TIMEOUT
        while not os.path.exists(self.fifo):
            if self.proc.poll() is not None:
                raise OursFailed(f"server exited with status {self.proc.returncode} "
                                 "before it created its FIFO" + self.last_words())
            if time.monotonic() > deadline:
                raise OursFailed(f"server made no FIFO within {READY_TIMEOUT:g}s"
                                 + self.last_words())
            time.sleep(0.01)

    def probe(self):
        """Check one file untimed: workers are forked and ready before any timing."""
        probe = os.path.join(self.dir, "probe")
        os.makedirs(probe)
        with open(os.path.join(probe, "file"), "wb") as f:
            f.write(b"probe\n")
        run_ours(self, probe, os.path.join(self.dir, "probe.sqlite"))

    def stop(self):
        """SIGTERM, wait, SIGKILL if it will not go; return its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()
        return self.proc.returncode

    def last_words(self, lines=5):
        return tail(self.stderr_path, lines, "server stderr")

    def cpu(self):
        """(the server's CPU seconds, {worker pid: its CPU seconds}) so far, or None."""
        if psutil is None:
            return None
        try:
            server = psutil.Process(self.proc.pid)
            own = cpu_seconds(server)
            workers = {}
            for child in server.children(recursive=True):
                try:
                    workers[child.pid] = cpu_seconds(child)
                except psutil.Error:
                    pass
        except psutil.Error:
            return None
        return own, workers


def cpu_seconds(process):
    times = process.cpu_times()
    return times.user + times.system


def run_ours(server, tree, catalog, sampler=None):
    """Run the client once on tree with the catalog file `catalog`; return its seconds.

    Any exit status but 0 is a failure: the trees the bench checks are never
    altered, so 1 (CHANGED or MISSING) is as wrong as 2 (could not check).
    """
    err_path = os.path.join(server.dir, "client.stderr")
    before = server.cpu()
    with open(err_path, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, CLIENT, "--fifo", server.fifo,
                                 "--catalog", catalog, tree],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err)
        try:
            if sampler:
                sampler.start(proc.pid)
            _, wait_status, usage = os.wait4(proc.pid, 0)
            proc.returncode = status = os.waitstatus_to_exitcode(wait_status)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if sampler:
                sampler.stop()
        seconds = time.perf_counter() - start
    after = server.cpu()
    server.last_cpu = None
    if before and after:
        server.last_cpu = {"client": usage.ru_utime + usage.ru_stime,
                           "server": after[0] - before[0],
                           "workers": sum(t - before[1].get(pid, 0.0)
                                          for pid, t in after[1].items())}
    if status != 0:
        meaning = {1: "reported CHANGED or MISSING on an untouched tree",
                   2: "could not do its job"}.get(status, "died")
        raise OursFailed(f"client exited with status {status} ({meaning}) on {tree}"
                         + tail(err_path, 5, "client stderr") + server.last_words())
    return seconds


def first_run(server, tree, catalog):
    """Run ours on a tree without sidecars; fail unless every file got one."""
    seconds = run_ours(server, tree, catalog)
    missing = files_without_sidecar(tree)
    if missing:
        raise OursFailed(f"a first run left {len(missing)} files without a sidecar, "
                         f"e.g. {missing[0]}")
    return seconds


class RssSampler:
    """Peak RSS of the server, each worker, server+workers, and the client.

    A thread samples every SAMPLE_INTERVAL from start() to stop(); peaks are
    in bytes.  A process that exits between two samples just reads as 0.
    """

    def __init__(self, server_pid):
        self.server = psutil.Process(server_pid)
        self.client = None
        self.peak = {"server": 0, "worker": 0, "pool": 0, "client": 0}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def start(self, client_pid):
        try:
            self.client = psutil.Process(client_pid)
        except psutil.Error:
            pass
        self._thread.start()

    def stop(self):
        self._done.set()
        self._thread.join()

    def _run(self):
        while True:
            self.sample()
            if self._done.wait(SAMPLE_INTERVAL):
                return

    def sample(self):
        try:
            workers = [rss(p) for p in self.server.children(recursive=True)]
        except psutil.Error:
            workers = []
        server = rss(self.server)
        self.peak["server"] = max(self.peak["server"], server)
        self.peak["worker"] = max([self.peak["worker"], *workers])
        self.peak["pool"] = max(self.peak["pool"], server + sum(workers))
        self.peak["client"] = max(self.peak["client"], rss(self.client))


def rss(process):
    try:
        return process.memory_info().rss if process else 0
    except psutil.Error:
        return 0


# -- peers --------------------------------------------------------------------

@dataclass(frozen=True)
class Peer:
    name: str           # as the table shows it
    needs: tuple        # programs that must be on PATH
    argv: object        # argv(tree) -> list

    def missing(self):
        return [p for p in self.needs if shutil.which(p) is None]


def xargs_md5sum(per_call):
    script = ("find \"$1\" -type f ! -name '*.md5' -print0 "
              f"| xargs -0 -P2 -n{per_call} md5sum")
    return Peer(f"xargs -P2 -n{per_call} md5sum", ("find", "xargs", "md5sum"),
                lambda tree: ["sh", "-c", script, "sh", tree])


MD5DEEP = Peer("md5deep -r", ("md5deep",), lambda tree: ["md5deep", "-r", tree])
PYTHON_REFERENCE = Peer("python, 1 process", (),
                        lambda tree: [sys.executable, THIS, "--reference-create", tree])
PYTHON_VERIFIER = Peer("python verify, 1 process", (),
                       lambda tree: [sys.executable, THIS, "--reference-verify", tree])


def run_peer(peer, tree, err_path, cpu=None):
    """Run a peer once; return its seconds, or None (with a log line) if it failed.

    `cpu`, a list, gets the CPU seconds of the peer and all it started."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(err_path, "wb") as err:
        start = time.perf_counter()
        status = subprocess.run(peer.argv(tree), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err).returncode
        seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if cpu is not None:
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    if status != 0:
        log(f"peer {peer.name!r} exited with status {status}"
            + tail(err_path, 3, "its stderr"))
        return None
    return seconds


def reference_create(root):
    """The plain peer of a first run: one process, no server, no threads.

    Walk with os.scandir, hash each file with hashlib.md5 and write
    `<file>.md5` ("HASH  NAME\\n", md5sum's format; the bench's names need no
    escaping) atomically: a temp file in the same directory, then os.replace.
    """
    for path in walk_files(root):
        if path.endswith(SUFFIX):
            continue
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "md5").hexdigest()
        tmp = f"{path}{SUFFIX}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f"{digest}  {os.path.basename(path)}\n")
        os.replace(tmp, path + SUFFIX)
    return 0


def reference_verify(root):
    """The plain peer of a verify: one process, no server, no threads, no catalog.

    Walk with os.scandir; for each file, read `<file>.md5`, take its hash,
    hash the file with hashlib.md5 and compare.  Exit 1 if any differs or
    has no sidecar.
    """
    bad = 0
    for path in walk_files(root):
        if path.endswith(SUFFIX):
            continue
        try:
            with open(path + SUFFIX, "rb") as f:
                expected = f.read(64).split(b" ", 1)[0].decode("ascii")
        except OSError:
            bad += 1
            continue
        with open(path, "rb") as f:
            bad += hashlib.file_digest(f, "md5").hexdigest() != expected
    return 1 if bad else 0


# -- the MD5 ceiling ----------------------------------------------------------

def md5_ceiling(cores):
    """Bytes/s of `openssl speed -evp md5 -multi cores` at 16 KiB blocks, or None."""
    if shutil.which("openssl") is None:
        return None
    log(f"measuring the MD5 ceiling: openssl speed -evp md5 -multi {cores}")
    try:
        out = subprocess.run(["openssl", "speed", "-evp", "md5", "-multi", str(cores),
                              "-seconds", "1"], capture_output=True, text=True,
                             timeout=300).stdout
    except subprocess.TimeoutExpired:
        return None
    return parse_openssl_speed(out)


def parse_openssl_speed(text):
    """Return the 16384-byte rate of openssl speed's md5 line, in bytes/s, or None.

    The sizes come from the "+H:16:64:...:16384" line of -multi (or the
    "type 16 bytes ..." header without it); the last line starting with md5
    holds the totals in 1000s of bytes per second ("1761673.22k").
    """
    sizes = re.search(r"\+H:([\d:]+)", text)
    sizes = sizes.group(1).split(":") if sizes else re.findall(r"(\d+) bytes", text)
    rows = [line.split()[1:] for line in text.splitlines() if re.match(r"md5\s", line)]
    if "16384" not in sizes or not rows:
        return None
    values = rows[-1]
    index = sizes.index("16384")
    if index >= len(values) or not values[index].endswith("k"):
        return None
    return float(values[index][:-1]) * 1000


# -- the phases ---------------------------------------------------------------

class Bench:
    """The three corpora, one at a time, each built, measured and removed."""

    def __init__(self, work, settings, report):
        self.work = work
        self.settings = settings
        self.report = report

    def compare(self, label, server, tree, catalog, peer, files, prepare=None):
        """Ours and peer alternately, `repeat` times each; add and return their medians.

        `prepare` runs untimed before every run of either side.  Returns
        (ours, peer) in seconds, peer None if it failed; None if it is missing.
        """
        if peer.missing():
            self.report.skip(f"{label} vs {peer.name}: {', '.join(peer.missing())} "
                             "not installed")
            return None
        peer_err = os.path.join(self.work, "peer.stderr")
        ours_cpu, peer_cpu = [], []

        def ours_run():
            seconds = run_ours(server, tree, catalog)
            if server.last_cpu:
                ours_cpu.append(server.last_cpu)
            return seconds
        sides = {"ours": (ours_run, []),
                 peer.name: (lambda: run_peer(peer, tree, peer_err, peer_cpu), [])}
        for i in range(1, self.settings.repeat + 1):
            for name, (run, times) in sides.items():
                if prepare:
                    prepare()
                times.append(run())
                shown = "failed" if times[-1] is None else fmt_seconds(times[-1])
                log(f"{label} run {i}: {name} {shown}")
        ours_times, peer_times = sides["ours"][1], sides[peer.name][1]
        ours = statistics.median(ours_times)
        theirs = None if None in peer_times else statistics.median(peer_times)
        cpu = {k: statistics.median(c[k] for c in ours_cpu)
               for k in ("client", "server", "workers")} if ours_cpu else None
        self.report.row(label, peer.name, ours, theirs, files, cpu,
                        statistics.median(peer_cpu) if theirs and peer_cpu else None)
        return ours, theirs

    def large(self):
        count, size = 8, max(64 * KiB, round(256 * MiB * self.settings.scale))
        label = f"L verify {count} x {fmt_bytes(size)}"
        root = os.path.join(self.work, "L")
        why_not = has_room(self.work, int(count * size * 1.25), count * 2 + 1)
        if why_not:
            self.report.skip(f"L corpus: {why_not}")
            return
        log(f"building L: {count} files of {fmt_bytes(size)}")
        build_large(root, count, size)
        try:
            catalog = catalog_path(self.work, "L-verify")
            with Server(self.work, "L") as server:
                first_run(server, root, catalog)
                warm_cache(root)
                times = self.compare(label, server, root, catalog, xargs_md5sum(1), count)
            self.ceiling(count * size, times)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def ceiling(self, total, times):
        """Add how close ours (and the peer) come to openssl's MD5 on every core."""
        cores = nproc()
        rate = md5_ceiling(cores)
        if rate is None:
            self.report.skip("MD5 ceiling: openssl missing or its output not understood")
            return
        best = total / rate
        line = (f"MD5 ceiling: openssl md5 -multi {cores} = {rate / 1e6:.0f} MB/s, "
                f"{fmt_seconds(best)} s for {fmt_bytes(total)}")
        if times:
            ours, theirs = times
            line += f"; ours at {best / ours:.0%} of it"
            if theirs:
                line += f", md5sum at {best / theirs:.0%}"
        self.report.note(line)

    def small(self):
        files, dirs = self.settings.count(20_000), self.settings.count(100)
        root = os.path.join(self.work, "S")
        need_bytes, need_inodes = tree_footprint(files, dirs, 16 * KiB)
        buried = 2 * self.settings.repeat * files     # old sidecars of the create runs
        why_not = has_room(self.work, need_bytes + buried * BLOCK, need_inodes + buried)
        if why_not:
            self.report.skip(f"S corpus: {why_not}")
            return
        log(f"building S: {files} files of 1-16 KiB in {dirs} directories")
        build_tree(root, files, dirs, 1 * KiB, 16 * KiB, seed=1)
        graveyard = Graveyard(self.work)
        verify_catalog = catalog_path(self.work, "S-verify")
        create_catalog = catalog_path(self.work, "S-create")

        def first_run_again():
            graveyard.bury_sidecars(root)
            delete_catalog(create_catalog)
        try:
            with Server(self.work, "S-verify") as server:
                first_run(server, root, verify_catalog)     # fills the verify catalog
                warm_cache(root)
                for peer in (MD5DEEP, xargs_md5sum(500), PYTHON_VERIFIER):
                    self.compare(f"S verify {files} files", server, root, verify_catalog,
                                 peer, files)
            self.measure_rss(f"S verify {files} files", root, verify_catalog)
            with Server(self.work, "S-create") as server:
                self.compare(f"S create {files} files", server, root, create_catalog,
                             PYTHON_REFERENCE, files, prepare=first_run_again)
        finally:
            shutil.rmtree(root, ignore_errors=True)
            graveyard.clear()

    def tiny(self):
        files = self.settings.count(self.settings.tiny)
        dirs = max(1, min(files, self.settings.count(1_000) * max(1, files // 200_000)))
        root = os.path.join(self.work, "T")
        if psutil is None:
            self.report.skip("T corpus (RSS only): psutil not installed")
            return
        why_not = has_room(self.work, *tree_footprint(files, dirs, 100))
        if why_not:
            self.report.skip(f"T corpus: {why_not}")
            return
        log(f"building T: {files} files of 100 bytes in {dirs} directories")
        build_tree(root, files, dirs, 100, 100, seed=2)
        try:
            warm_cache(root)
            self.measure_rss(f"T create {files} files", root,
                             catalog_path(self.work, "T-create"), first=True)
            self.measure_rss(f"T verify {files} files", root,
                             catalog_path(self.work, "T-verify"), seed=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def measure_rss(self, label, tree, catalog, first=False, seed=False):
        """One run of ours on a fresh server, sampled; add its peaks and seconds.

        first: the catalog is deleted before the run; seed: an untimed run of
        ours on a server of its own fills the catalog first.
        """
        if psutil is None:
            self.report.skip(f"RSS of {label}: psutil not installed")
            return
        name = label.replace(" ", "-")
        if first:
            delete_catalog(catalog)
        if seed:
            with Server(self.work, f"{name}-seed") as server:
                run_ours(server, tree, catalog)
        with Server(self.work, name) as server:
            sampler = RssSampler(server.proc.pid)
            seconds = run_ours(server, tree, catalog, sampler)
        if first and files_without_sidecar(tree):
            raise OursFailed(f"{label}: a first run left files without a sidecar")
        log(f"{label} (RSS run): ours {fmt_seconds(seconds)}")
        self.report.rss(label, sampler.peak, seconds)


# -- the report ---------------------------------------------------------------

@dataclass
class Report:
    settings: Settings
    rows: list = field(default_factory=list)
    rss_lines: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    failures: list = field(default_factory=list)

    def row(self, corpus, peer, ours, theirs, files=None, cpu=None, peer_cpu=None):
        ratio = f"{theirs / ours:.2f}" if theirs else "n/a"
        if cpu:
            total = sum(cpu.values())
            ours_cpu = (f"{total:.2f} = {cpu['client']:.2f}/{cpu['server']:.2f}/"
                        f"{cpu['workers']:.2f}")
            per_file = (f"{total / files * 1e6:.0f} = " + "/".join(
                f"{cpu[k] / files * 1e6:.0f}" for k in ("client", "server", "workers")))
        else:
            ours_cpu = per_file = "n/a"
        theirs_cpu = (f"{peer_cpu:.2f} ({peer_cpu / files * 1e6:.0f})"
                      if peer_cpu is not None and files else "n/a")
        self.rows.append((corpus, peer, fmt_seconds(ours),
                          fmt_seconds(theirs) if theirs else "failed", ratio,
                          ours_cpu, per_file, theirs_cpu))

    def rss(self, label, peak, seconds):
        mib = {k: f"{v / MiB:.1f}" for k, v in peak.items()}
        self.rss_lines.append(
            (f"peak RSS {label}", f"server {mib['server']} MiB",
             f"max worker {mib['worker']} MiB", f"server+workers {mib['pool']} MiB",
             f"client {mib['client']} MiB", f"({fmt_seconds(seconds)} s)"))

    def note(self, line):
        self.notes.append(line)

    def skip(self, what):
        log(f"skipped: {what}")
        self.skipped.append(what)

    def fail(self, what):
        log(f"FAILED: {what}")
        self.failures.append(what)

    def render(self):
        """The report as paragraphs: title, timings, notes, RSS, what was left out."""
        s = self.settings
        title = [f"osproject bench: BENCH_SCALE={s.scale:g}, medians of "
                 f"BENCH_REPEAT={s.repeat} interleaved runs", f"machine: {machine()}"]
        header = ("corpus", "peer", "ours s", "peer s", "peer/ours",
                  "ours CPU s c/s/w", "ours CPU us/file c/s/w", "peer CPU s (us/file)")
        timings = table([header, *self.rows], right=(2, 3, 4, 5, 6, 7)) if self.rows else []
        memory = table(self.rss_lines, right=(2, 3, 4, 5)) if self.rss_lines else []
        left_out = ([f"skipped: {what}" for what in self.skipped]
                    + [f"FAILED: {what}" for what in self.failures])
        paragraphs = (title, timings, self.notes, memory, left_out)
        return "\n\n".join("\n".join(p) for p in paragraphs if p)


def table(rows, right=()):
    """Align columns two spaces apart; columns listed in `right` align right."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                      for i, (cell, w) in enumerate(zip(row, widths, strict=False))).rstrip()
            for row in rows]


def machine():
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            found = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        model = found.group(1).strip() if found else model
    except OSError:
        pass
    return (f"{nproc()} CPUs ({model}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def nproc():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def fmt_seconds(seconds):
    return f"{seconds:.3f}" if seconds < 10 else f"{seconds:.2f}"


def fmt_bytes(n):
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def tail(path, lines, what):
    try:
        with open(path, "rb") as f:
            text = f.read()[-4096:].decode("utf-8", "replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "".join(f"\n    {what}: {line}" for line in text)


# -- main ---------------------------------------------------------------------

def main():
    settings = Settings.from_env()
    report = Report(settings)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up as on Ctrl-C
    work = tempfile.mkdtemp(prefix="osproject-bench-")
    try:
        bench = Bench(work, settings, report)
        for phase in (bench.large, bench.small, bench.tiny):
            try:
                phase()
            except OursFailed as exc:
                report.fail(str(exc))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report.render())
    return 1 if report.failures else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--reference-create":
        sys.exit(reference_create(sys.argv[2]))
    if len(sys.argv) == 3 and sys.argv[1] == "--reference-verify":
        sys.exit(reference_verify(sys.argv[2]))
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; its temp files are removed", file=sys.stderr)
        sys.exit(130)
