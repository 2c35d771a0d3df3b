"""The client: one lister thread, five checker threads, one reply reader.

The lister feeds a bounded queue, so memory does not grow with the tree.
Each checker takes a batch of up to five entries at a time (each batch goes
to exactly one checker, by the queue's own lock), reads their baselines, sends them as
one request under the send lock, and keeps a few requests in flight; the
reader thread routes each reply to the checker that asked, by request id.
"""

import itertools
import os
import queue
import threading

from . import protocol, store
from .connection import ClientError, Connection
from .lister import ERROR, FILE, ORPHAN, SKIP, Entry, Lister
from .progress import INTERVAL as PROGRESS_INTERVAL
from .verifier import CHANGED, MISSING, SKIPPED

CHECKERS = 5
WINDOW = 3              # requests each checker keeps in flight: 75 files in all
QUEUE_SIZE = 200        # batches of five entries


class Client:
    """Check trees through a server; report to a Report."""

    def __init__(self, connection, report, store_dir=None, excludes=(), update=False):
        self.conn = connection
        self.report = report
        self.update = update
        self.lister = Lister(store_dir, excludes)
        self.store_dir = store_dir
        self.queue = queue.Queue(QUEUE_SIZE)
        self.waiting = {}                   # request id -> SimpleQueue of replies
        self.waiting_lock = threading.Lock()
        self.reader_done = False            # no more replies will be routed
        self.rids = itertools.count(1)
        self.listed = 0                     # entries listed: for the progress line
        self.failure = None                 # the first reason we cannot go on
        self.stop = threading.Event()
        self.bye = None

    def run(self, roots):
        """Check every root; return the exit status."""
        self.conn.send({"roots": [os.path.abspath(r) for r in roots[:protocol.MAX_ROOTS]],
                        "count": len(roots)})           # for the server's log
        reader = threading.Thread(target=self.read_replies, name="reader", daemon=True)
        # Daemons, so that Ctrl-C in the main thread ends the client at once.
        lister = threading.Thread(target=self.list_all, args=(roots,), name="lister",
                                  daemon=True)
        checkers = [threading.Thread(target=Checker(self).run, name=f"checker-{i}",
                                     daemon=True) for i in range(CHECKERS)]
        reader.start()
        lister.start()
        for t in checkers:
            t.start()
        for t in [lister, *checkers]:
            while t.is_alive():
                self.report.show_progress(self.listed)
                t.join(PROGRESS_INTERVAL)
        self.conn.finish_requests()
        reader.join()
        self.conn.close()
        if self.failure:
            raise ClientError(self.failure)
        return self.report.finish()

    def fail(self, reason):
        if self.failure is None:
            self.failure = reason
        self.stop.set()

    # -- the lister thread ------------------------------------------------
    def list_all(self, roots):
        """Queue the entries in batches of five: one queue operation per batch."""
        batch = []
        try:
            for root in roots:
                for entry in self.lister.walk(root):
                    self.listed += 1
                    batch.append(entry)
                    if len(batch) == protocol.MAX_PATHS:
                        if not self.put(batch):
                            return
                        batch = []
            if batch:
                self.put(batch)
        finally:
            for _ in range(CHECKERS):
                self.put(None, force=True)

    def put(self, item, force=False):
        """Queue an entry; give up when the run has failed (unless forced)."""
        while True:
            if self.stop.is_set() and not force:
                return False
            try:
                self.queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                if force and self.stop.is_set():
                    return False

    # -- the checker threads ----------------------------------------------
    def take_batch(self):
        """Take the next batch of up to five entries; return (batch, lister_done)."""
        batch = self.queue.get()
        return ([], True) if batch is None else (batch, False)

    def register(self, replies):
        """Give a new request id whose replies the reader routes to `replies`."""
        rid = next(self.rids)
        with self.waiting_lock:
            if self.reader_done:
                raise ClientError(self.failure or "the server went away")
            self.waiting[rid] = replies
        return rid

    def unregister(self, rid):
        with self.waiting_lock:
            self.waiting.pop(rid, None)

    def prepare(self, entry):
        """Return (entry, request item), the item None once reported here."""
        if entry.kind == SKIP:
            self.report.add(entry.path, SKIPPED, error=entry.reason)
            return entry, None
        if entry.kind == ERROR:
            self.report.add(entry.path, "ERROR", error=entry.reason)
            return entry, None
        if entry.kind == ORPHAN:
            return self.prepare_orphan(entry)
        try:
            # Not in the listing: a new file.  A sidecar made since then (by
            # a second client on this tree) makes the worker's link(2) fail,
            # an ERROR; if that worker dies first, its successor replaces the
            # sidecar (it cannot tell it from one the dead worker wrote).
            expected = None if entry.listed is False else \
                store.read_baseline(entry.sidecar, os.path.basename(entry.key))
        except store.SidecarError as exc:
            self.report.add(entry.path, "ERROR", error=str(exc))
            return entry, None
        item = {"kind": "check", "path": entry.key, "sidecar": entry.sidecar,
                "expected": expected, "size": entry.size}
        if self.update:
            item["update"] = True
        return entry, item

    def prepare_orphan(self, entry):
        """A sidecar without its file: MISSING if it is ours, else a file to check."""
        try:
            recorded = store.read_baseline(entry.sidecar, os.path.basename(entry.key))
        except store.SidecarError:
            recorded = None
        if recorded is None:        # not one of ours: someone's file named *.md5
            shown = entry.path + store.SUFFIX if self.store_dir is None else entry.sidecar
            own = entry.sidecar
            return self.prepare(Entry(FILE, shown, own,
                                      store.sidecar_path(own, self.store_dir)))
        return entry, {"kind": "missing", "path": entry.key, "sidecar": entry.sidecar,
                       "expected": recorded}

    def forget(self, entry):
        """--update: remove the sidecar of a MISSING file; return why not, or None.

        Only if the file is still missing from the very directory the lister
        found it missing in: the directory is opened and compared by identity
        (a directory swapped for a symlink since must not lead us into another
        tree), and the rest happens relative to it.
        """
        name = os.path.basename(entry.path)
        try:
            fd = os.open(os.path.dirname(entry.path) or ".", os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            return f"sidecar kept: {exc.strerror}"
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != entry.where:
                return "sidecar kept: its directory was replaced meanwhile"
            if _exists(name, fd):
                return "sidecar kept: the file is back"
            removed = (store.discard_sidecar(entry.sidecar, name) if self.store_dir
                       else store.discard_sidecar(name + store.SUFFIX, name, dir_fd=fd))
        finally:
            os.close(fd)
        return None if removed else "its sidecar could not be removed"

    # -- the reader thread --------------------------------------------------
    def read_replies(self):
        try:
            for frame in self.conn.frames():
                self.route(frame)
        except (OSError, protocol.ProtocolError) as exc:
            self.fail(f"lost the server: {exc}")
        except ClientError as exc:          # the server said why it ends the session
            self.fail(str(exc))
        finally:
            if self.bye is None:
                self.fail("the server closed the session before it was done")
            with self.waiting_lock:
                self.reader_done = True
                for replies in self.waiting.values():
                    replies.put(None)

    def route(self, frame):
        if "replies" in frame:
            by_checker = {}         # one hand-off per checker per frame, not per file
            with self.waiting_lock:
                for reply in frame["replies"]:
                    replies = self.waiting.get(reply["id"])
                    if replies is not None:
                        by_checker.setdefault(id(replies), (replies, []))[1].append(reply)
            for replies, batch in by_checker.values():
                replies.put(batch)
        elif "correct" in frame:
            fix = frame["correct"]
            self.report.correct(fix["path"], fix["status"], fix.get("md5"), fix.get("error"))
        elif "bye" in frame:
            self.bye = frame["bye"]


class Checker:
    """One checker thread: up to WINDOW requests in flight, its replies handed to it.

    Keeping a few requests in flight hides the round trip through the server
    and a worker; each file is still taken, asked about and reported by
    exactly this one checker.
    """

    def __init__(self, client):
        self.client = client
        self.replies = queue.SimpleQueue()  # lists of replies, from the reader thread
        self.inflight = {}                  # rid -> [[(entry, item)...], replies due]

    def run(self):
        try:
            self.loop()
        except ClientError as exc:
            self.client.fail(str(exc))
        except OSError as exc:
            self.client.fail(f"lost the server: {exc.strerror or exc}")
        finally:
            for rid in self.inflight:
                self.client.unregister(rid)

    def loop(self):
        done = False
        while not self.client.stop.is_set():
            self.collect(block=False)
            if not done and len(self.inflight) < WINDOW:
                batch, done = self.client.take_batch()
                self.ask(batch)
            elif self.inflight:
                self.collect(block=True)
            else:
                return

    def ask(self, entries):
        """Resolve what can be resolved here; send the rest as one request."""
        asked = []
        for entry in entries:
            entry, item = self.client.prepare(entry)
            if item is not None:
                asked.append((entry, item))
        if not asked:
            return
        rid = self.client.register(self.replies)
        self.inflight[rid] = [asked, len(asked)]
        self.client.conn.send({"id": rid, "files": [item for _, item in asked]})

    def collect(self, block):
        """Report the replies that have arrived; with block, wait for some first."""
        while True:
            try:
                batch = self.replies.get(block=block)
            except queue.Empty:
                return
            if batch is None:
                raise ClientError(self.client.failure or "the server went away")
            for reply in batch:
                self.record(reply)
            block = False

    def record(self, reply):
        rid = reply["id"]
        state = self.inflight[rid]
        entry, item = state[0][reply["i"]]
        status, error = reply["status"], reply.get("error")
        if status == MISSING and self.client.update:
            error = self.client.forget(entry)
        updated = self.client.update and status in (CHANGED, MISSING) and not error
        self.client.report.add(entry.path, status, reply.get("md5"),
                               reply.get("expected"), error, updated=updated,
                               unchecked=reply.get("unchecked", False), key=item["path"])
        state[1] -= 1
        if not state[1]:
            del self.inflight[rid]
            self.client.unregister(rid)


def _exists(name, dir_fd):
    """Is there anything called `name` in the directory? (True when unsure.)"""
    try:
        os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    except OSError:
        pass
    return True


def server_status(fifo):
    """Ask a server how its workers and clients are doing; return the report."""
    conn = Connection(fifo)
    conn.open()
    try:
        conn.send({"status": True})
        for frame in conn.frames():
            if "status" in frame:
                return frame["status"]
        raise ClientError("the server closed the session without a status")
    except (OSError, protocol.ProtocolError) as exc:
        raise ClientError(f"lost the server: {exc}") from None
    finally:
        conn.close()


def check(roots, fifo, report, **options):
    """Connect, check the roots, and return the exit status (2 on failure)."""
    conn = Connection(fifo)
    conn.open()
    try:
        return Client(conn, report, **options).run(roots)
    finally:
        conn.close()


__all__ = ["Client", "ClientError", "check", "server_status"]
