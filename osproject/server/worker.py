"""The worker process: read an assignment, hash each file, write sidecars, reply.

A worker is untrusted compute.  It never sees an expected hash; it reports
what it read and the server decides.  It talks only through its two pipes
and leaves through os._exit, so nothing of the server's (atexit hooks, the
log file, buffered stdio) runs twice.
"""

import contextlib
import errno
import hashlib
import os
import random
import signal
import stat
import sys
import time

from .. import protocol, store
from ..statuses import describe_kind

CHUNK = 128 * 1024          # measured: larger reads are no faster, and cost RSS
PROGRESS_INTERVAL = 0.25    # seconds between "still alive" frames on a big file
# A file changed within one timestamp tick of our reading may change again
# without its stat changing: such a reading can be honest and still differ.
RACY_FINE_NS = 100_000_000        # ns timestamps, set from a coarse clock (ms)
RACY_COARSE_NS = 2_000_000_000    # whole-second timestamps (HFS+, FAT, some NFS)
EXIT_SERVER_GONE = 0
EXIT_PROTOCOL = 3
EXIT_CHAOS = 70


def child_main(to_worker, from_worker, chaos):
    """Run in a freshly forked child; never return."""
    status = EXIT_PROTOCOL
    try:
        _sanitize(keep=(to_worker, from_worker))
        status = WorkerProcess(to_worker, from_worker, chaos).serve()
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 0
    except BaseException:  # noqa: BLE001 - last words go to the inherited stderr
        import traceback
        traceback.print_exc()
        status = EXIT_PROTOCOL
    finally:
        try:
            sys.stderr.flush()
        finally:
            os._exit(status)


def _sanitize(keep):
    """Undo what the child inherited from the server: signals and fds."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)  # SIGPIPE: die when the server does
    signal.signal(signal.SIGTERM, _exit_on_term)
    os.setpgid(0, 0)  # the server kills the whole group: our children die too
    _schedule_as_batch()
    # stdin/stdout become /dev/null so that no stray fd 0/1 is ever a file we
    # write; stderr stays for a traceback if the worker itself has a bug.
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    low, high = sorted(keep)
    os.closerange(3, low)
    os.closerange(low + 1, high)
    os.closerange(high + 1, _max_fd())


def _schedule_as_batch():
    """Be a CPU-bound batch task (Linux's SCHED_BATCH), where there is one.

    The server writes an assignment, and a worker it wakes that way would
    otherwise preempt it at once: on two cores, measured, each such write
    took 22-39 us of the server's wall time instead of 6-10, the loop held
    up before it had fed the other workers or answered its client.  A batch
    task does not preempt a running one when it wakes (the tick may, later)
    and has the same weight, a little disfavoured on wakeups.  Only from the
    default policy: a server the operator runs under another (chrt -i,
    systemd's CPUSchedulingPolicy=) keeps it for its workers.  Elsewhere
    (macOS), or where the call is refused, nothing changes.
    """
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_BATCH"):
        try:
            if os.sched_getscheduler(0) == os.SCHED_OTHER:
                os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except OSError:
            pass


def _max_fd():
    """Where to stop closing: Linux closes any range in one syscall, macOS loops
    fd by fd, so a huge or unlimited RLIMIT_NOFILE is capped (the server
    never holds anywhere near 65536 fds: select() stops at FD_SETSIZE)."""
    try:
        limit = os.sysconf("SC_OPEN_MAX")
    except (ValueError, OSError):
        limit = -1
    return 65536 if limit <= 0 else min(limit, 65536)


def _exit_on_term(signum, frame):
    raise SystemExit(0)  # unwinds through write_sidecar, which removes its temp file


@contextlib.contextmanager
def sigterm_deferred():
    """Hold SIGTERM back while in the block; it comes, as SystemExit, after.

    write_sidecar removes its temp file in a finally, but a SIGTERM that
    came between the temp file's open(2) and that try left it behind: a
    worker spends much of a first run just there, so every SIGTERM of the
    server during one left a few empty temp files.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class WorkerProcess:
    """Serve assignments from one pipe, answer on the other."""

    def __init__(self, to_worker, from_worker, chaos):
        self.rfd = to_worker
        self.wfd = from_worker
        # Only the faults asked for: the server names every one, at 0 when off.
        self.chaos = {k: v for k, v in (chaos or {}).items() if v}
        self.parent = os.getppid()
        self.rng = random.Random()
        self._last_progress = 0.0
        self._aid = 0             # the assignment in hand (ids start at 1)
        self.files_done = 0
        self.dirs = Directories()

    def serve(self):
        """Answer assignments until the server closes our pipe; return an exit status."""
        stillborn = self.chaos.get("stillborn")
        if stillborn and os.path.exists(stillborn):
            return EXIT_CHAOS             # chaos: die before we ever say ready
        self.send(protocol.ready(os.getpid()))
        frames = protocol.FrameBuffer()
        while True:
            data = os.read(self.rfd, 65536)
            if not data:
                return EXIT_SERVER_GONE
            for fields in frames.feed(data):
                if fields is None:
                    return EXIT_PROTOCOL
                self.handle(*protocol.read_assignment(fields))

    def handle(self, aid, tasks):
        """Do one assignment and send its results."""
        self._aid = aid
        self.dirs.next_assignment()
        self.misbehave()
        results = [self.do_file(task) for task in tasks]
        if self.chaos and self.rng.random() < self.chaos.get("garble", 0.0):
            return self.garble(results)
        self.send(protocol.results(self._aid, results))

    def garble(self, results):
        """Chaos: answer with garbage, an oversized frame, or one result too many."""
        kind = self.rng.randrange(3)
        if kind == 0:
            os.write(self.wfd, protocol.pack([os.urandom(200)]))
        elif kind == 1:
            os.write(self.wfd, protocol.pack([b"x" * (protocol.MAX_FRAME + 1024)]))
        else:
            self.send(protocol.results(self._aid, results + results[:1]))

    def misbehave(self):
        """Chaos: crash or freeze on this assignment, as --chaos asked."""
        if not self.chaos:
            return
        if self.rng.random() < self.chaos.get("crash", 0.0):
            os._exit(EXIT_CHAOS)
        if self.rng.random() < self.chaos.get("hang", 0.0):
            while os.getppid() == self.parent:   # frozen, but not immortal
                time.sleep(0.2)
            os._exit(EXIT_SERVER_GONE)

    def do_file(self, task):
        """Hash one file and, if asked, write its sidecar; return the result dict."""
        directory, _, name = task.path.rpartition("/")
        directory = directory or "/"            # a file in the root directory
        try:
            dir_fd = self.dirs.open(directory, task.dir)
        except OSError as exc:      # DirectoryReplaced among them: nothing is read
            return {"error": _strerror(exc)}
        if task.write == "discard":       # no hash was agreed: no baseline
            return {"discarded": self.discard(task, dir_fd, name)}
        result = hash_file(name, self.progress, dir_fd=dir_fd)
        md5 = result.get("md5")
        self.files_done += 1
        if md5 and self.chaos and self.files_done > self.chaos.get("honest_first", 0) \
                and self.rng.random() < self.chaos.get("lie", 0.0):
            # A random lie, as bad RAM would tell: two liars never agree on one.
            result["md5"] = md5 = os.urandom(16).hex()
        if md5 and "unstable" not in result and task.write != "keep":
            self.write(task, result, dir_fd, name)
        return result

    def sidecar_dir(self, task, dir_fd, create=False):
        """Return (fd of the sidecar's directory, whether to close it, its name)."""
        where, sidecar_name = os.path.split(task.sidecar)
        if where == os.path.dirname(task.path):
            return dir_fd, False, sidecar_name
        return store.open_store_directory(where, create), True, sidecar_name

    def discard(self, task, dir_fd, name):
        try:
            fd, own, sidecar = self.sidecar_dir(task, dir_fd)
        except OSError:
            return False
        try:
            return store.discard_sidecar(sidecar, name, dir_fd=fd)
        finally:
            if own:
                os.close(fd)

    def write(self, task, result, dir_fd, name):
        replace = task.write == "replace"
        try:
            fd, own, sidecar = self.sidecar_dir(task, dir_fd, create=True)
        except OSError as exc:
            result["error"] = f"cannot write sidecar: {_strerror(exc)}"
            return
        try:
            for pid in task.stale:
                remove_stale_temps(fd, pid)
            with sigterm_deferred():
                written = store.write_sidecar(sidecar, result["md5"], name, replace,
                                              dir_fd=fd)
            if not written:     # another client's first run, most likely: same hash?
                written = _holds(sidecar, name, result["md5"], fd)
        except OSError as exc:
            result["error"] = f"cannot write sidecar: {_strerror(exc)}"
            return
        finally:
            if own:
                os.close(fd)
        result["wrote"] = written
        if not written:
            result["error"] = "a sidecar appeared meanwhile; not overwritten"

    def progress(self):
        """Tell the server we are alive on a long file; exit if it is gone."""
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_INTERVAL:
            self._last_progress = now
            if os.getppid() != self.parent:
                os._exit(EXIT_SERVER_GONE)
            self.send(protocol.progress(self._aid))

    def send(self, data):
        while data:
            data = data[os.write(self.wfd, data):]


def hash_file(path, progress=lambda: None, dir_fd=None):
    """Return {md5, size, mtime, ctime, ino, racy} for a regular file, or
    {error} / {skipped} / {unstable} with the reason.

    The open never blocks and never follows a link; only a regular file is
    read.  Afterwards its name is stat'ed again: still the inode we read
    (else it was replaced while read), whose stat, the very one fstat(2)
    would give now, must be what it was before the reading (else it changed
    while read).  With dir_fd, `path` is a name in that directory.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError as exc:
        return _open_failure(path, exc, dir_fd)
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            return {"skipped": describe_kind(before.st_mode)}
        started = time.time_ns()
        digest = _digest(fd, before.st_size, progress)
        try:
            after = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            return {"error": "vanished while it was read"}
        if after.st_ino != before.st_ino or after.st_dev != before.st_dev:
            after = os.fstat(fd)        # what we read is no longer the file's
            replaced = True
        else:
            replaced = False
    except OSError as exc:
        return {"error": _strerror(exc)}
    finally:
        os.close(fd)
    result = {"md5": digest, "size": after.st_size, "mtime": after.st_mtime_ns,
              "ctime": after.st_ctime_ns, "ino": after.st_ino,
              "racy": is_racy(after, started)}
    if _fingerprint(before) != _fingerprint(after):
        result["unstable"] = "changed while it was read"
    elif replaced:
        result["unstable"] = "replaced while it was read"
    return result


def is_racy(st, started_ns):
    """Did the reading start within a timestamp tick of the file's last change?

    The ctime counts as well as the mtime: `touch -d` can hide a write from
    the mtime, never from the ctime.
    """
    changed = max(st.st_mtime_ns, st.st_ctime_ns)
    window = RACY_COARSE_NS if changed % 1_000_000_000 == 0 else RACY_FINE_NS
    return started_ns - changed < window


def _digest(fd, size, progress):
    """MD5 of the first `size` bytes (fewer if it shrank); growth shows in fstat.

    A small file is read in one read(2), with no buffer of our own; a big
    one, or one a first read did not read whole, through a CHUNK buffer.
    """
    data = os.read(fd, size) if 0 < size <= CHUNK else b""
    if len(data) == size:
        return hashlib.md5(data).hexdigest()
    md5 = hashlib.md5(data)
    buf = bytearray(min(CHUNK, max(size, 1)))
    view = memoryview(buf)
    left = size - len(data)
    while left > 0:
        n = os.readv(fd, [buf])
        if not n:
            break
        md5.update(view[:n])
        left -= n
        progress()
    return md5.hexdigest()


def _fingerprint(st):
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _open_failure(path, exc, dir_fd=None):
    if exc.errno == errno.ELOOP:
        return {"skipped": "symbolic link"}
    if exc.errno in (errno.ENXIO, errno.EOPNOTSUPP):  # a socket cannot be opened
        try:
            return {"skipped": describe_kind(os.lstat(path, dir_fd=dir_fd).st_mode)}
        except OSError:
            pass
    return {"error": _strerror(exc)}


def _holds(sidecar, name, md5, dir_fd):
    """Does the sidecar that appeared meanwhile hold `md5` already?"""
    try:
        return store.read_baseline(sidecar, name, dir_fd=dir_fd) == md5
    except store.SidecarError:
        return False


def remove_stale_temps(dir_fd, pid):
    """Remove the temp sidecars a killed worker `pid` left in this directory."""
    prefix = f".osp-{int(pid)}-"
    try:
        names = [n for n in os.listdir(dir_fd)
                 if n.startswith(prefix) and n.endswith(".tmp")]
    except OSError:
        return
    for name in names:
        try:
            os.unlink(name, dir_fd=dir_fd)
        except OSError:
            pass


class Directories:
    """The directory fds a worker reads and writes through, a few kept open.

    A directory is used only if it is the very one the client's lister saw
    (its (st_dev, st_ino)): a path that now leads elsewhere, through a
    directory swapped for a symlink, is an error, never a file read or a
    sidecar written outside the tree.  A kept fd is safe whatever happens
    to the path later; the path is still stat'ed for each file, so that a
    swap is reported even where the fd would have read the right directory.
    """

    KEEP = 16

    def __init__(self):
        self.fds = {}
        self.checked = set()        # keys whose path was stat'ed in this assignment

    def open(self, path, identity):
        """Return an fd of the directory at `path` that is `identity`, or raise OSError."""
        if not identity:
            raise store.DirectoryReplaced(errno.EINVAL, "no identity for its directory")
        key = (path, identity)
        fd = self.fds.pop(key, None)
        if fd is not None and key not in self.checked:
            try:
                st = os.stat(path)
            except OSError:
                st = None
            if st is None or (st.st_dev, st.st_ino) != key[1]:
                os.close(fd)
                fd = None
        if fd is None:
            fd = store.open_directory(path or "/", identity)
            if len(self.fds) >= self.KEEP:
                os.close(self.fds.pop(next(iter(self.fds))))
        self.fds[key] = fd          # most recently used last
        self.checked.add(key)
        return fd

    def next_assignment(self):
        """Paths are re-checked once per assignment, not once per file."""
        self.checked.clear()


def _strerror(exc):
    return exc.strerror or str(exc)
