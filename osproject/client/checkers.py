"""The client: one lister thread, five checker threads, one reply reader.

The lister feeds a bounded queue, so memory does not grow with the tree.
It judges what needs no hashing itself (directories, symlinks, special
files, entries gone since the catalog recorded them); each checker takes a
batch of up to BATCH entries at a time (each batch goes to exactly one
checker, by the queue's own lock), sends the regular files among them as
one request under the send lock (the server cuts it into assignments of
at most five), and keeps a few requests in flight; the reader thread
records each reply itself, against the entry its request id and index
name, and frees the asking checker's place for its next request once the
last verdict of a request is in: no second hand-off per reply.  When all
is in, the report prints the findings in path order, the catalog records
them in one transaction, and the alterations go to the server's log, the
audit trail.
"""

import itertools
import os
import queue
import sys
import threading

from .. import protocol, store
from ..statuses import ERROR, MISSING, MOVED, OK
from . import findings
from .connection import ClientError, Connection
from .lister import Entry, Lister
from .progress import INTERVAL as PROGRESS_INTERVAL

CHECKERS = 5
BATCH = protocol.MAX_REQUEST    # entries per queued batch, and so per request
WINDOW = 2              # requests each checker keeps in flight: 500 files in all
QUEUE_SIZE = 20         # batches of BATCH entries: 1,000 entries listed ahead
AUDIT_PER_FRAME = 50    # alterations per audit frame


class Client:
    """Check trees through a server against a catalog; report to a Report."""

    def __init__(self, connection, report, store_dir=None, excludes=(), update=False,
                 catalog=None):
        self.conn = connection
        self.report = report
        self.update = update
        self.catalog = catalog
        self.lister = Lister(store_dir, excludes, catalog, update)
        self.store_dir = store_dir
        self.queue: queue.Queue[list[Entry | findings.Finding] | None] = queue.Queue(QUEUE_SIZE)
        self.waiting: dict[int, _Request] = {}  # request id -> _Request, until fully answered
        self.waiting_lock = threading.Lock()
        self.reader_done = False            # no more replies will be routed
        self.rids = itertools.count(1)
        self.listed = 0                     # entries listed: for the progress line
        self.failure = None                 # the first reason we cannot go on
        self.failure_said = False           # ... and whether the server gave it
        self.stop = threading.Event()
        self.bye = None
        self.audit = []                     # alterations, for the server's log

    def run(self, roots):
        """Check every root; return the exit status."""
        try:
            self.conn.send(protocol.roots([os.path.abspath(r) for r in roots],
                                          len(roots)))  # for the server's log
        except OSError as exc:      # it died between its welcome and now
            raise ClientError(f"lost the server: {exc.strerror or exc}") from None
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
        self.report.show_progress(self.listed)      # the last count, however quick
        self.conn.finish_requests()
        reader.join()
        self.conn.close()
        if self.failure:
            raise ClientError(self.failure)
        self.report.release(self.accept)
        if self.catalog is not None:
            self.catalog.commit_run([os.path.abspath(root) for root in roots])
        return self.report.summary()

    def accept(self, finding, audit=True):
        """A final finding: the catalog records it, the audit trail hears of it."""
        if self.catalog is not None:
            if finding.stage is not None:
                self.catalog.stage(finding.stage)
            if finding.forget:
                self.catalog.stage_delete(finding.key, subtree=finding.was is not None
                                          and finding.was.kind == "dir")
        if audit and (finding.altered or finding.status == MOVED):
            self.audit.append(audit_event(finding))

    def fail(self, reason, said_by_server=False):
        """Stop the run; the first reason stands, unless the server's own word
        (an error frame) comes after a mere broken pipe, which it explains."""
        if self.failure is None or (said_by_server and not self.failure_said):
            self.failure = reason
            self.failure_said = said_by_server
        self.stop.set()

    # -- the lister thread ------------------------------------------------
    def list_all(self, roots):
        """Queue the entries in batches of BATCH: one queue operation per batch."""
        batch = []
        try:
            for root in roots:
                for entry in self.lister.walk(root):
                    self.listed += 1
                    batch.append(entry)
                    if len(batch) == BATCH:
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
        """Take the next batch of up to BATCH entries; return (batch, lister_done)."""
        batch = self.queue.get()
        return ([], True) if batch is None else (batch, False)

    def register(self, request):
        """Give a new request id, whose replies the reader records for `request`."""
        rid = next(self.rids)
        with self.waiting_lock:
            if self.reader_done:
                raise ClientError(self.failure or "the server went away")
            self.waiting[rid] = request
        return rid

    def unregister(self, rid):
        with self.waiting_lock:
            self.waiting.pop(rid, None)

    def prepare(self, entry):
        """Return (entry, request item), the item None once reported here."""
        if not isinstance(entry, Entry):        # judged by the lister already
            if entry.status == MISSING and self.update and entry.sidecar:
                entry = entry._replace(error=self.forget(entry))
            self.report.add(entry)
            return entry, None
        if not protocol.nameable(entry.key, entry.sidecar):
            # (A --store mirror deeper than SIDECARS_MAX, say.)  Its own
            # ERROR, not the run's end: the server would refuse the request.
            self.report_file(entry, ERROR, None, "its path or its sidecar's is too long "
                                                 "for a request")
            return entry, None
        # A file without a sidecar in the listing is new.  A sidecar made since
        # then (by a second client on this tree) makes the worker's link(2)
        # fail, an ERROR; if that worker dies first, its successor replaces the
        # sidecar (it cannot tell it from one the dead worker wrote).
        return entry, protocol.check_item(entry.key, entry.sidecar, entry.dir,
                                          entry.expected, entry.size, self.update)

    def forget(self, finding):
        """--update: remove the sidecar of a MISSING file; return why not, or None.

        Only if the file is still missing from the very directory the lister
        found it missing in: the directory is opened and compared by identity
        (a directory swapped for a symlink since must not lead us into another
        tree), and the rest happens relative to it.  Below a deleted
        directory there is no directory to look in: nothing to remove.
        """
        if finding.dir is None:
            return None
        name = os.path.basename(finding.key)
        try:
            fd = store.open_directory(os.path.dirname(finding.key), finding.dir)
        except store.DirectoryReplaced:
            return "sidecar kept: its directory was replaced meanwhile"
        except OSError as exc:
            return f"sidecar kept: {exc.strerror}"
        try:
            if _exists(name, fd):
                return "sidecar kept: the file is back"
            if self.store_dir is not None:
                self.discard_stored(finding.sidecar, name)
                return None
            if not _exists(name + store.SUFFIX, fd):
                return None             # gone with its file
            removed = store.discard_sidecar(name + store.SUFFIX, name, dir_fd=fd)
        finally:
            os.close(fd)
        return None if removed else "its sidecar could not be removed"

    def repair(self, entry, md5):
        """--update: put a sidecar the catalog disagrees with right; return why not."""
        where, sidecar_name = os.path.split(entry.sidecar)
        try:
            if self.store_dir is None:
                fd = store.open_directory(where, entry.dir)
            else:
                fd = store.open_store_directory(where, create=True)
        except OSError as exc:
            return f"sidecar not repaired: {exc.strerror}"
        try:
            store.write_sidecar(sidecar_name, md5, os.path.basename(entry.key), True,
                                dir_fd=fd)
        except OSError as exc:
            return f"sidecar not repaired: {exc.strerror}"
        finally:
            os.close(fd)
        return None

    @staticmethod
    def discard_stored(sidecar, name):
        """Remove a --store sidecar, reached without following a symlink."""
        where, sidecar_name = os.path.split(sidecar)
        try:
            fd = store.open_store_directory(where)
        except OSError:
            return False
        try:
            return store.discard_sidecar(sidecar_name, name, dir_fd=fd)
        finally:
            os.close(fd)

    # -- the reader thread --------------------------------------------------
    def read_replies(self):
        try:
            for frame in self.conn.frames():
                self.route(frame)
        except (OSError, protocol.ProtocolError) as exc:
            self.fail(f"lost the server: {exc}")
        except ClientError as exc:          # the server said why it ends the session
            self.fail(str(exc), said_by_server=True)
        finally:
            if self.bye is None:
                self.fail("the server closed the session before it was done")
            with self.waiting_lock:
                self.reader_done = True
                for request in self.waiting.values():
                    request.checker.places.release()    # it wakes, and sees us gone
                self.waiting.clear()

    def route(self, frame):
        if "ok" in frame:           # files found OK at once: their hash is the one sent
            waiting = self.waiting
            for rid, *indexes in protocol.read_oks(frame):
                request = waiting.get(rid)
                if request is not None:
                    self.record_oks(request, rid, indexes)
        elif "replies" in frame:
            waiting = self.waiting
            for reply in frame["replies"]:
                request = waiting.get(reply["id"])
                if request is not None:
                    self.record(request, reply["id"], reply["i"], reply["status"],
                                reply.get("md5"), reply.get("error"),
                                reply.get("unchecked", False))
        elif "correct" in frame:
            fix = frame["correct"]
            self.report.correct(fix["path"], fix["status"], fix.get("md5"), fix.get("error"))
        elif "bye" in frame:
            self.bye = frame["bye"]

    def record_oks(self, request, rid, indexes):
        """record() the files of a request an ok frame names: those found as
        recorded (the clean night's every file) are counted in one go."""
        entries, taken, quiet = request.entries, 0, 0
        counts_only = self.report.counts_only
        for index in indexes:
            entry = _take(entries, index)
            if entry is None:
                continue
            taken += 1
            if counts_only and entry.covered and findings.as_recorded(entry, OK, entry.expected):
                quiet += 1
            else:
                self.report_file(entry, OK, entry.expected)
        if quiet:
            self.report.add_as_recorded(quiet)  # nothing of them is printed or recorded
        if taken:
            self.settled(request, rid, taken)

    def record(self, request, rid, index, status, md5=None, error=None, unchecked=False):
        """Report one verdict, in the reader thread; the last of a request frees
        its checker's place.  A verdict the request does not hold, or one it
        had already, is ignored.  An OK without a hash (an ok frame's) is of
        the hash the file was checked against."""
        entry = _take(request.entries, index)
        if entry is None:
            return
        if md5 is None and status == OK:
            md5 = entry.expected
        if self.report.counts_only and entry.covered and findings.as_recorded(entry, status, md5,
                                                                      unchecked):
            self.report.add_as_recorded()       # nothing of it is printed or recorded
        else:
            self.report_file(entry, status, md5, error, unchecked)
        self.settled(request, rid)

    def report_file(self, entry, status, md5, error=None, unchecked=False):
        finding = findings.of_file(entry, status, md5, error, self.update, unchecked=unchecked)
        if finding.repair:
            finding = finding._replace(error=self.repair(entry, finding.md5))
        self.report.add(finding)

    def settled(self, request, rid, files=1):
        """`files` more of the request are answered; its last frees its checker's place."""
        request.due -= files
        if not request.due:
            with self.waiting_lock:
                if self.waiting.pop(rid, None) is not None:
                    request.checker.places.release()


def _take(entries, index):
    """The entry at `index` of a request, once: None for an index it does not
    hold (a server's bug, not trusted) or one answered already."""
    if type(index) is not int or not 0 <= index < len(entries):
        return None
    entry = entries[index]
    entries[index] = None
    return entry


class _Request:
    """A request in flight: its entries by index, until the reader has them all."""
    __slots__ = ("checker", "entries", "due")

    def __init__(self, checker, entries):
        self.checker = checker
        self.entries = entries          # the reader sets each to None once answered
        self.due = len(entries)


class Checker:
    """One checker thread: up to WINDOW requests in flight.

    Keeping a few requests in flight hides the round trip through the server
    and a worker; each file is taken and asked about by exactly this one
    checker, and its verdict reported by the reader, which frees one of the
    checker's places per request answered in full.
    """

    def __init__(self, client):
        self.client = client
        self.places = threading.Semaphore(WINDOW)   # one per request not in flight

    def run(self):
        try:
            self.loop()
        except ClientError as exc:
            self.client.fail(str(exc))
        except OSError as exc:
            self.client.fail(f"lost the server: {exc.strerror or exc}")

    def loop(self):
        client = self.client
        while True:
            self.places.acquire()
            self.check_reader()
            if client.stop.is_set():
                return
            batch, done = client.take_batch()
            if done:
                self.places.release()
                break
            self.ask(batch)
        for _ in range(WINDOW):         # the last replies: all places back
            self.places.acquire()
            self.check_reader()

    def check_reader(self):
        """Raise ClientError once the reader is gone before the session's end."""
        if self.client.reader_done and self.client.bye is None:
            raise ClientError(self.client.failure or "the server went away")

    def ask(self, entries):
        """Resolve what can be resolved here; send the rest as one request
        (in requests of MAX_PATHS if one would make too long a frame)."""
        asked = []
        for entry in entries:
            entry, item = self.client.prepare(entry)
            if item is not None:
                asked.append((entry, item))
        if not asked:
            self.places.release()
            return
        if self.send(asked):
            return
        chunks = [asked[i:i + protocol.MAX_PATHS]      # long paths: five always fit
                  for i in range(0, len(asked), protocol.MAX_PATHS)]
        self.send(chunks[0], force=True)
        for chunk in chunks[1:]:
            self.places.acquire()
            self.check_reader()
            self.send(chunk, force=True)

    def send(self, asked, force=False):
        """Send `asked` as one request; unless forced, send nothing and return
        False when its frame would be longer than MAX_FRAME."""
        client = self.client
        rid = client.register(_Request(self, [entry for entry, _ in asked]))
        data = protocol.encode(protocol.request(rid, [item for _, item in asked]))
        if len(data) > protocol.MAX_FRAME and not force:
            client.unregister(rid)
            return False
        client.conn.send_data(data)
        return True


def _exists(name, dir_fd):
    """Is there anything called `name` in the directory? (True when unsure.)"""
    try:
        os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    except OSError:
        pass
    return True


def server_status(fifo, private_dir=False):
    """Ask a server how its workers and clients are doing; return the report."""
    conn = Connection(fifo, private_dir=private_dir)
    conn.open()
    try:
        conn.send(protocol.STATUS_REQUEST)
        status = None
        for frame in conn.frames():     # to the end: the server's bye finds us there
            if "status" in frame:
                status = frame["status"]
                conn.finish_requests()
        if status is None:
            raise ClientError("the server closed the session without a status")
        return status
    except (OSError, protocol.ProtocolError) as exc:
        raise ClientError(f"lost the server: {exc}") from None
    finally:
        conn.close()


def check(roots, fifo, report, private_dir=False, catalog=None, **options):
    """Connect, check the roots, and return the exit status (2 on failure)."""
    conn = Connection(fifo, private_dir=private_dir)
    conn.open()
    try:
        client = Client(conn, report, catalog=catalog, **options)
        status = client.run(roots)
    finally:
        conn.close()
    send_audit(fifo, private_dir, client.audit, conn.session)
    return status


def audit_event(finding):
    """The server's log line for one alteration: (event, fields)."""
    fields = {"path": finding.key}
    if finding.status == MISSING:
        return "file.missing", {**fields, "was": finding.was.kind if finding.was else None}
    fields["status"] = finding.status
    if finding.changes:
        fields["changes"] = ",".join(c.attribute for c in finding.changes)
        for change in finding.changes:
            if change.attribute in AUDITED:
                fields[f"was_{change.attribute}"] = _audit_value(change.attribute, change.was)
                fields[f"now_{change.attribute}"] = _audit_value(change.attribute, change.now)
    if finding.error:
        fields["error"] = finding.error
    if finding.status == MOVED:
        return "file.moved", {**fields, "to": finding.moved_key, "md5": finding.expected}
    return "file.changed", fields


AUDITED = ("type", "mode", "owner", "group", "target", "device", "content", "sidecar", "size")


def _audit_value(attribute, value):
    if attribute == "mode" and isinstance(value, int):
        return f"{value:04o}"
    if isinstance(value, bytes):
        return os.fsdecode(value)
    if isinstance(value, int):
        return value
    return None if value is None else str(value)


def send_audit(fifo, private_dir, events, check_session=None):
    """Tell the server's log what this run found: the audit trail a fleet collects.

    On a session of its own, once the findings are final (the check's own
    session ends when the server has said its last word on them).
    """
    if not events:
        return
    conn = Connection(fifo, private_dir=private_dir)
    try:
        conn.open()
        for i in range(0, len(events), AUDIT_PER_FRAME):
            conn.send(protocol.audit([{"event": event, "check": check_session, **fields}
                                      for event, fields in events[i:i + AUDIT_PER_FRAME]]))
        conn.finish_requests()
        if not any("bye" in frame for frame in conn.frames()):
            raise ClientError("the server refused them (see its log)")
    except (ClientError, OSError, protocol.ProtocolError) as exc:
        # The report is out and the catalog recorded: the run stands.
        sys.stderr.write(f"integrity-client: warning: the server did not log these "
                         f"findings: {exc}\n")
    finally:
        conn.close()


__all__ = ["Client", "ClientError", "check", "server_status"]
