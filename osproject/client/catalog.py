"""The catalog: the client's own record of every entry under its checked roots.

A sidecar is a copy for `md5sum -c`; whoever rewrites a file can rewrite it.
The catalog is one SQLite file outside every checked tree (docs/catalog.md).
It is refused, never treated as empty, when it cannot be trusted: a symlink,
another user's file, inside a checked tree, in a directory others may write,
or damaged.  Writes are staged per run and take effect in one transaction at
commit_run, so a client killed mid-run leaves the catalog as the last
completed run made it, and the next run reports everything the killed one
would have.

The comparison rules (compare, is_alteration, describe) are pure functions
of two Records, so they are tested without a file system.
"""

import functools
import grp
import os
import pwd
import socket
import sqlite3
import stat
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple, Self

SCHEMA_VERSION = "1"
APPLICATION_ID = 0x4F535043     # "OSPC" in the SQLite header: ours, at a glance
BUSY_TIMEOUT = 10.0             # seconds a writer waits for another client's transaction
BATCH_ROWS = 2000               # staged rows per write transaction
PAGE_ROWS = 2000                # rows per query while streaming a subtree
STALE_AFTER_NS = 24 * 3600 * 10**9   # a run silent this long is dead, whatever its pid
_HEADER = b"SQLite format 3\x00"

AnyPath = str | bytes       # paths are taken either way; the catalog keeps bytes

FILE, DIR, SYMLINK, FIFO, SOCKET = "file", "dir", "symlink", "fifo", "socket"
CHARDEV, BLOCKDEV, OTHER = "chardev", "blockdev", "other"
KINDS = (FILE, DIR, SYMLINK, FIFO, SOCKET, CHARDEV, BLOCKDEV, OTHER)
_DEVICES = (CHARDEV, BLOCKDEV)
_KIND_OF = {stat.S_IFREG: FILE, stat.S_IFDIR: DIR, stat.S_IFLNK: SYMLINK,
            stat.S_IFIFO: FIFO, stat.S_IFSOCK: SOCKET, stat.S_IFCHR: CHARDEV,
            stat.S_IFBLK: BLOCKDEV}
_KIND_NAMES = {FILE: "regular file", DIR: "directory", SYMLINK: "symbolic link",
               FIFO: "FIFO", SOCKET: "socket", CHARDEV: "character device",
               BLOCKDEV: "block device", OTHER: "special file of unknown type"}
# What os.fsencode() and os.fsdecode() do to a str, without their Python-level call.
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()


class CatalogError(Exception):
    """The catalog cannot be trusted or used; str() says why (client exits 2)."""


def default_path(environ: Mapping[str, str] = os.environ) -> str:
    """$INTEGRITY_CATALOG, else $XDG_STATE_HOME/osproject/catalog.sqlite, else ~/.local/state/..."""
    if environ.get("INTEGRITY_CATALOG"):
        return environ["INTEGRITY_CATALOG"]
    state = environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(state):        # the XDG spec: a relative value is ignored
        home = environ.get("HOME") or pwd.getpwuid(os.getuid()).pw_dir
        state = os.path.join(home, ".local", "state")
    return os.path.join(state, "osproject", "catalog.sqlite")


# -- records and the comparison rules ------------------------------------

class Record(NamedTuple):
    path: bytes          # absolute, normalised; any bytes but NUL
    kind: str
    mode: int            # stat.S_IMODE: setuid, setgid and sticky included
    uid: int
    gid: int
    size: int
    ino: int
    nlink: int
    mtime_ns: int
    ctime_ns: int
    rdev: int = 0        # devices only
    target: bytes | None = None  # symlinks only
    md5: str | None = None       # regular files only: the hash the server agreed


def record_from_stat(path: AnyPath, st: os.stat_result, target: AnyPath | None = None,
                     md5: str | None = None) -> Record:
    """The Record of an lstat() result; `target` and `md5` kept only where they mean something."""
    kind = _KIND_OF.get(stat.S_IFMT(st.st_mode), OTHER)
    return Record(path.encode(_FS_ENCODING, _FS_ERRORS) if type(path) is str  # os.fsencode
                  else os.fsencode(path), kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                  st.st_size, st.st_ino, st.st_nlink, st.st_mtime_ns, st.st_ctime_ns,
                  st.st_rdev if kind in _DEVICES else 0,
                  os.fsencode(target) if kind == SYMLINK and target is not None else None,
                  md5 if kind == FILE else None)


class Change(NamedTuple):
    attribute: str
    was: object
    now: object


ALTERATIONS = frozenset({"type", "mode", "owner", "group", "target", "device", "content",
                         "sidecar"})
_ALWAYS = (("mode", "mode"), ("owner", "uid"), ("group", "gid"))
_NOTED = (("mtime", "mtime_ns"), ("ctime", "ctime_ns"), ("inode", "ino"), ("links", "nlink"))


def compare(was: Record, now: Record) -> list[Change]:
    """The attributes that differ between two Records of one path, in a fixed order.

    A change of type reports the type, permission bits, owner and group (an
    attacker's swap can move them too) and the noted attributes, but not
    target, device, content or size: those follow from the type and would
    only repeat it.  A directory's size is never compared (it moves with
    every entry added), and content only when both sides have a hash.
    """
    changes = []
    same_kind = was.kind == now.kind
    if not same_kind:
        changes.append(Change("type", was.kind, now.kind))
    # A symlink's own permission bits mean nothing (Linux: always 0777).
    links = SYMLINK in (was.kind, now.kind)
    changes.extend(Change(name, getattr(was, field), getattr(now, field))
                   for name, field in _ALWAYS if getattr(was, field) != getattr(now, field)
                   and not (links and name == "mode"))
    if same_kind:
        if was.kind == SYMLINK and was.target != now.target:
            changes.append(Change("target", was.target, now.target))
        if was.kind in _DEVICES and was.rdev != now.rdev:
            changes.append(Change("device", was.rdev, now.rdev))
        if (was.kind == FILE and was.md5 is not None and now.md5 is not None
                and was.md5 != now.md5):
            changes.append(Change("content", was.md5, now.md5))
        if was.kind != DIR and was.size != now.size:
            changes.append(Change("size", was.size, now.size))
    changes.extend(Change(name, getattr(was, field), getattr(now, field))
                   for name, field in _NOTED if getattr(was, field) != getattr(now, field))
    return changes


def is_alteration(changes: Iterable[Change]) -> bool:
    """Does any change make the entry CHANGED?  mtime, ctime, inode, links, size alone do not."""
    return any(change.attribute in ALTERATIONS for change in changes)


def describe(changes: Iterable[Change], was: Record, now: Record) -> str:
    """Human text of the alterations only, joined with "; " ("mode 0755 -> 4755")."""
    parts = []
    for attribute, old, new in changes:
        if attribute == "type":
            parts.append(f"{kind_name(was)} -> {kind_name(now)}")
        elif attribute == "mode":
            parts.append(f"mode {old:04o} -> {new:04o}")
        elif attribute == "owner":
            parts.append(f"owner {_user(old)} -> {_user(new)}")
        elif attribute == "group":
            parts.append(f"group {_group(old)} -> {_group(new)}")
        elif attribute == "target":
            parts.append(f"target {_show(old)} -> {_show(new)}")
        elif attribute == "device":
            parts.append(f"device {_device(old)} -> {_device(new)}")
        elif attribute == "content":
            parts.append(f"content {old} -> {new}")
        elif attribute == "sidecar":
            parts.append(f"sidecar altered (catalog {old or 'none'}, sidecar {new or 'none'})")
    return "; ".join(parts)


def kind_name(record: Record) -> str:
    """ "regular file", "directory", "symbolic link to X", "character device 1,3" ..."""
    name = _KIND_NAMES[record.kind]
    if record.kind == SYMLINK and record.target is not None:
        return f"{name} to {_show(record.target)}"
    if record.kind in _DEVICES:
        return f"{name} {_device(record.rdev)}"
    return name


def as_json(record: Record) -> dict[str, object]:
    """The attributes of a Record for --json's "was" and "now" objects."""
    return {"kind": record.kind, "mode": f"{record.mode:04o}", "uid": record.uid,
            "gid": record.gid, "size": record.size, "inode": record.ino,
            "links": record.nlink, "mtime_ns": record.mtime_ns, "ctime_ns": record.ctime_ns,
            "device": _device(record.rdev) if record.kind in _DEVICES else None,
            "target": None if record.target is None else os.fsdecode(record.target),
            "md5": record.md5}


def _show(path):
    """A path for a terminal, as report.show_path shows it (not imported: report may import us)."""
    if path is None:
        return "(none)"
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _device(rdev):
    return f"{os.major(rdev)},{os.minor(rdev)}"


@functools.lru_cache(maxsize=256)
def _user(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@functools.lru_cache(maxsize=256)
def _group(gid):
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


# -- the file -------------------------------------------------------------

_COLUMNS = ("path, kind, mode, uid, gid, size, ino, nlink, mtime_ns, ctime_ns, rdev, "
            "target, md5")       # Record's order: a row is Record._make(row)
_SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE roots (path BLOB PRIMARY KEY, recorded_ns INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE entries (
    path BLOB PRIMARY KEY, parent BLOB NOT NULL, kind TEXT NOT NULL,
    mode INTEGER NOT NULL, uid INTEGER NOT NULL, gid INTEGER NOT NULL,
    size INTEGER NOT NULL, ino INTEGER NOT NULL, nlink INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, rdev INTEGER NOT NULL,
    target BLOB, md5 TEXT) WITHOUT ROWID;
CREATE INDEX entries_parent ON entries (parent);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, pid INTEGER NOT NULL, host TEXT NOT NULL,
    started_ns INTEGER NOT NULL, heard_ns INTEGER NOT NULL);
CREATE TABLE staged (
    run INTEGER NOT NULL, seq INTEGER NOT NULL, action TEXT NOT NULL,
    path BLOB NOT NULL, parent BLOB, kind TEXT, mode INTEGER, uid INTEGER, gid INTEGER,
    size INTEGER, ino INTEGER, nlink INTEGER, mtime_ns INTEGER, ctime_ns INTEGER,
    rdev INTEGER, target BLOB, md5 TEXT,
    PRIMARY KEY (run, seq)) WITHOUT ROWID;
INSERT INTO meta VALUES ('schema', '{SCHEMA_VERSION}'), ('application', 'osproject catalog');
PRAGMA application_id = {APPLICATION_ID};
"""
_TABLES = {"meta", "roots", "entries", "runs", "staged"}
PUT, DROP, PRUNE = "put", "drop", "prune"     # staged actions: record, forget, forget a subtree


class Catalog:
    """One open catalog; every method may be called from any thread."""

    def __init__(self, path: str, con: sqlite3.Connection) -> None:
        self.path = path
        self._con: Any = con        # a sqlite3.Connection; None once closed
        self._lock = threading.Lock()
        self._run: int | None = None    # our runs.id once the first batch is written
        self._seq = 0
        self._pending: list[tuple] = []     # staged rows not yet written (no run id yet)
        self._segments: list[list] = []     # [action, first seq, last seq]: order to apply in
        self._broken: str | None = None     # why this run can no longer be committed

    @classmethod
    def open(cls, path: AnyPath, roots: Iterable[AnyPath] = ()) -> Self:
        """Open the catalog at `path`, creating it when absent; refuse one we cannot trust."""
        path = os.path.abspath(os.fsdecode(path))
        directory = os.path.dirname(path)
        _refuse_inside_roots(path, roots)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
            _make_directory(directory)
        except OSError as exc:
            raise CatalogError(f"catalog {_show(path)}: {exc.strerror}") from None
        _check_directory(directory)     # before creating anything in it
        if st is None:
            st = _create(path)
        _check_file(path, st)
        _check_header(path)
        con = _connect(path)
        try:
            _check_content(path, con)
            con.execute("PRAGMA journal_mode = WAL")
            con.execute("PRAGMA synchronous = NORMAL")
        except BaseException as exc:
            con.close()
            if isinstance(exc, sqlite3.Error):
                raise _error(path, exc) from None
            raise
        catalog = cls(path, con)
        catalog._clean_dead_runs()
        return catalog

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading: committed entries only ----------------------------------
    def knows_root(self, root: AnyPath) -> bool:
        """Has a completed run committed `root`, or a directory above it?"""
        root = os.fsencode(root)
        above = [root]
        while os.path.dirname(above[-1]) != above[-1]:     # "//" is its own parent too
            above.append(os.path.dirname(above[-1]))
        marks = ",".join("?" * len(above))
        return bool(self._query(f"SELECT 1 FROM roots WHERE path IN ({marks}) LIMIT 1",
                                above))

    def children(self, directory: AnyPath) -> dict[bytes, Record]:
        """name -> Record of the entries directly in `directory`: one indexed query."""
        directory = os.fsencode(directory).rstrip(b"/") or b"/"
        rows = self._query(f"SELECT {_COLUMNS} FROM entries WHERE parent = ?", (directory,))
        return {os.path.basename(row[0]): Record._make(row) for row in rows}

    def children_named(self, directory: AnyPath) -> dict[str, Record]:
        """children(), keyed by the names as os.listdir() gives them (str):
        the lister's lookups then need no os.fsencode() per name."""
        directory = os.fsencode(directory).rstrip(b"/") or b"/"
        rows = self._query(f"SELECT {_COLUMNS} FROM entries WHERE parent = ?", (directory,))
        make = Record._make
        return {row[0].rpartition(b"/")[2].decode(_FS_ENCODING, _FS_ERRORS): make(row)
                for row in rows}

    def subtree(self, directory: AnyPath) -> Iterator[Record]:
        """Every entry strictly below `directory`, by path, a page at a time.

        BLOBs compare as memcmp, so the entries below "/a/b" are those between
        "/a/b/" and "/a/b0" ("0" follows "/"): "/a/b-c" is outside.  The lock
        is not held between pages, so other threads are not kept waiting.
        """
        prefix = os.fsencode(directory).rstrip(b"/") + b"/"
        low, high = prefix, prefix[:-1] + b"0"
        while True:
            rows = self._query(f"SELECT {_COLUMNS} FROM entries WHERE path > ? AND path < ?"
                               f" ORDER BY path LIMIT {PAGE_ROWS}", (low, high))
            yield from map(Record._make, rows)
            if len(rows) < PAGE_ROWS:
                return
            low = rows[-1][0]

    def get(self, path: AnyPath) -> Record | None:
        """The committed Record of `path`, or None."""
        rows = self._query(f"SELECT {_COLUMNS} FROM entries WHERE path = ?",
                           (os.fsencode(path),))
        return Record._make(rows[0]) if rows else None

    def count(self) -> int:
        """How many entries are committed."""
        return self._query("SELECT count(*) FROM entries")[0][0]

    def _query(self, sql, params=()):
        """All the rows, fetched under the lock: a cursor left open would hold a read snapshot."""
        with self._lock:
            try:
                return self._con.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise _error(self.path, exc) from None

    # -- writing: staged, applied at commit_run ---------------------------
    def stage(self, record: Record) -> None:
        """Record or replace this entry when the run commits."""
        path = _checked(record.path)
        parent = os.path.dirname(path) if path != b"/" else b""
        target = None if record.target is None else os.fsencode(record.target)
        self._add(PUT, (path, parent, record.kind, record.mode, record.uid, record.gid,
                        record.size, record.ino, record.nlink, record.mtime_ns,
                        record.ctime_ns, record.rdev, target, record.md5))

    def stage_delete(self, path: AnyPath, subtree: bool = False) -> None:
        """Forget this entry (with subtree, everything below it too) when the run commits."""
        self._add(PRUNE if subtree else DROP, (_checked(path),) + (None,) * 13)

    def _add(self, action, row):
        with self._lock:
            if self._broken:
                raise CatalogError(self._broken)
            self._seq += 1
            if self._segments and self._segments[-1][0] == action:
                self._segments[-1][2] = self._seq
            else:
                self._segments.append([action, self._seq, self._seq])
            self._pending.append((self._seq, action) + row)
            if len(self._pending) >= BATCH_ROWS:
                self._fail_on_error(self._write, self._flush)

    def _flush(self):
        """Write the pending rows under our run id, registering the run first (in a transaction)."""
        if not self._pending:
            return
        now, run = time.time_ns(), self._run
        if run is None:
            run = self._con.execute(
                "INSERT INTO runs (pid, host, started_ns, heard_ns) VALUES (?, ?, ?, ?)",
                (os.getpid(), socket.gethostname(), now, now)).lastrowid
        else:                   # a heartbeat: a run still staging is not stale
            self._con.execute("UPDATE runs SET heard_ns = ? WHERE id = ?", (now, run))
        self._con.executemany("INSERT INTO staged VALUES (?" + ", ?" * 16 + ")",
                              ((run,) + row for row in self._pending))
        self._run, self._pending = run, []

    def _fail_on_error(self, work, *args):
        """Call work(*args); if it raises CatalogError, this run can no longer be committed."""
        try:
            return work(*args)
        except CatalogError as exc:
            self._broken, self._pending = str(exc), []
            raise

    def commit_run(self, roots: Iterable[AnyPath]) -> int:
        """Apply this run's staged rows and mark `roots` known, in one transaction.

        Returns how many entries were written or removed.
        """
        roots = [os.fsencode(root) for root in roots]
        with self._lock:
            if self._broken:
                raise CatalogError(f"nothing recorded: {self._broken}")
            staged = self._segments
        if not staged and all(self.knows_root(root) for root in roots):
            return 0        # a clean verify writes nothing
        with self._lock:
            applied = self._fail_on_error(self._write, self._apply, roots)
            self._forget_run()
            return applied

    def _apply(self, roots):
        self._flush()
        if self._run is not None and self._con.execute("SELECT 1 FROM runs WHERE id = ?",
                                                       (self._run,)).fetchone() is None:
            raise CatalogError(f"catalog {_show(self.path)}: this run's staged records "
                               f"were discarded as stale by another client; run again")
        applied = 0
        for action, first, last in self._segments:
            span = (self._run, first, last)
            if action == PUT:
                applied += self._con.execute(
                    f"INSERT OR REPLACE INTO entries (parent, {_COLUMNS}) "
                    f"SELECT parent, {_COLUMNS} FROM staged "
                    "WHERE run = ? AND seq BETWEEN ? AND ? ORDER BY seq", span).rowcount
            elif action == DROP:
                applied += self._con.execute(
                    "DELETE FROM entries WHERE path IN (SELECT path FROM staged "
                    "WHERE run = ? AND seq BETWEEN ? AND ?)", span).rowcount
            else:
                applied += sum(self._prune(path) for path, in self._con.execute(
                    "SELECT path FROM staged WHERE run = ? AND seq BETWEEN ? AND ?",
                    span).fetchall())
        now = time.time_ns()
        self._con.executemany("INSERT OR REPLACE INTO roots VALUES (?, ?)",
                              ((root, now) for root in roots))
        self._drop_run(self._run)
        return applied

    def _prune(self, path):
        prefix = path.rstrip(b"/") + b"/"
        return self._con.execute("DELETE FROM entries WHERE path = ? OR (path > ? AND path < ?)",
                                 (path, prefix, prefix[:-1] + b"0")).rowcount

    def abandon_run(self) -> None:
        """Drop this run's staged rows; the catalog stays as the last commit left it."""
        with self._lock:
            run = self._run
            self._forget_run()
            if run is not None:
                try:
                    self._write(self._drop_run, run)
                except CatalogError:
                    pass        # its rows are cleaned at a later open, once we are gone

    def _forget_run(self):
        self._run, self._seq, self._pending, self._segments = None, 0, [], []
        self._broken = None

    def _drop_run(self, run):
        self._con.execute("DELETE FROM staged WHERE run = ?", (run,))
        self._con.execute("DELETE FROM runs WHERE id = ?", (run,))

    def _write(self, work, *args):
        """Run work(*args) in one write transaction (the caller holds the lock), or CatalogError.

        BEGIN IMMEDIATE takes the write lock up front, so the busy timeout
        applies; a deferred transaction upgraded later could fail at once.
        """
        try:
            self._con.execute("BEGIN IMMEDIATE")
            try:
                result = work(*args)
                self._con.execute("COMMIT")
            except BaseException:
                if self._con.in_transaction:
                    self._con.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise _error(self.path, exc, writing=True) from None
        return result

    def _clean_dead_runs(self):
        """Drop staged rows of runs whose process is gone or that fell silent a day ago.

        Best effort: a catalog we may only read is left as it is.
        """
        host, now = socket.gethostname(), time.time_ns()
        dead = [run for run, pid, run_host, heard in
                self._query("SELECT id, pid, host, heard_ns FROM runs")
                if now - heard > STALE_AFTER_NS or (run_host == host and not _alive(pid))]
        if dead:
            with self._lock:
                try:
                    for run in dead:
                        self._write(self._drop_run, run)
                except CatalogError:
                    pass

    def close(self) -> None:
        """Abandon an uncommitted run and close the file."""
        if self._con is None:
            return
        self.abandon_run()
        with self._lock:
            self._con.close()
            self._con = None


def _checked(path):
    path = os.fsencode(path)
    if not path.startswith(b"/") or (path.endswith(b"/") and path != b"/") or b"\0" in path:
        raise ValueError(f"not an absolute normalised path: {path!r}")
    return path


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- opening: the refusals -------------------------------------------------

def _refuse_inside_roots(path, roots):
    """Refuse a catalog inside a checked tree (or that is a root): links, bind mounts too."""
    directory = os.path.realpath(os.path.dirname(path))
    real = os.path.join(directory, os.path.basename(path))
    above = []              # (st_dev, st_ino) of the catalog's directory and each one above it
    walk = directory
    while True:
        try:
            st = os.stat(walk)
            above.append((st.st_dev, st.st_ino))
        except OSError:
            pass            # not there yet: we create it
        if walk == "/":
            break
        walk = os.path.dirname(walk)
    for root in roots:
        tree = os.path.realpath(os.fsdecode(root))
        inside = real == tree or real.startswith(tree.rstrip("/") + "/")
        try:
            st = os.stat(tree)
            inside = inside or (stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) in above)
        except OSError:
            pass
        if inside:
            raise CatalogError(
                f"catalog {_show(path)} lies inside the checked tree {_show(root)}: it would "
                "check its own record; keep it outside (--catalog FILE or $INTEGRITY_CATALOG)")


def _create(path):
    """Make the catalog, schema and all, appear at `path` at once; return its lstat.

    The schema is built in a temp file beside it and linked into place, so a
    crash leaves either no catalog or a whole one (and at worst a temp file).
    link() never replaces: a catalog another client made meanwhile wins.
    """
    directory = os.path.dirname(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                                   suffix=".new")      # O_EXCL|O_NOFOLLOW, 0600
    except OSError as exc:
        raise CatalogError(f"cannot create catalog {_show(path)}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)
        os.close(fd)
        con = sqlite3.connect(tmp, isolation_level=None)
        try:
            con.executescript(_SCHEMA)
            con.execute("PRAGMA journal_mode = WAL")
        finally:
            con.close()         # the last connection: the WAL is checkpointed and removed
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        try:
            os.link(tmp, path, follow_symlinks=False)
        except FileExistsError:
            pass
        _fsync_dir(directory)
        return os.lstat(path)
    except (OSError, sqlite3.Error) as exc:
        why = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise CatalogError(f"cannot create catalog {_show(path)}: {why}") from None
    finally:
        for leftover in (tmp, tmp + "-wal", tmp + "-shm", tmp + "-journal"):
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass


def _make_directory(directory):
    """Create the catalog's directory, and any missing parent, mode 0700
    whatever the umask (XDG asks 0700 of ~/.local/state as well)."""
    if os.path.isdir(directory):
        return
    parent = os.path.dirname(directory)
    if parent != directory:
        _make_directory(parent)
    try:
        os.mkdir(directory, 0o700)
        os.chmod(directory, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise CatalogError(f"cannot create the catalog's directory {_show(directory)}: "
                           f"{exc.strerror}") from None


def _fsync_dir(directory):
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_directory(directory):
    """Only we (or root) may add, remove or rename files where the catalog lives."""
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise CatalogError(f"catalog directory {_show(directory)}: {exc.strerror}") from None
    if st.st_uid not in (os.geteuid(), 0):
        raise CatalogError(f"catalog directory {_show(directory)} belongs to uid {st.st_uid}, "
                           f"not to this user (uid {os.geteuid()}): its owner could swap the "
                           "catalog; keep it in a directory of your own")
    if st.st_mode & 0o022:
        raise CatalogError(f"catalog directory {_show(directory)} is writable by group or "
                           f"others (mode {stat.S_IMODE(st.st_mode):04o}): they could swap "
                           f"the catalog; chmod go-w it, or keep the catalog elsewhere")
    _check_ancestors(os.path.dirname(os.path.realpath(directory)))


def _check_ancestors(directory):
    """Nobody else may rename a directory above the catalog (as ssh's StrictModes):
    whoever can could move the catalog aside, and the next run would be a
    silent first run.  A sticky world-writable one (/tmp) is fine."""
    while True:
        try:
            st = os.stat(directory)
        except OSError as exc:
            raise CatalogError(f"catalog directory {_show(directory)}: {exc.strerror}") \
                from None
        if st.st_uid not in (os.geteuid(), 0) or (st.st_mode & 0o022
                                                  and not st.st_mode & stat.S_ISVTX):
            raise CatalogError(f"catalog: {_show(directory)}, above it, belongs to uid "
                               f"{st.st_uid} or is writable by others (mode "
                               f"{stat.S_IMODE(st.st_mode):04o}): they could move the "
                               "catalog aside; keep it in a directory only you control")
        parent = os.path.dirname(directory)
        if parent == directory:
            return
        directory = parent


def _check_file(path, st):
    """A regular file of ours that nobody else may write; never a symlink."""
    if stat.S_ISLNK(st.st_mode):
        raise CatalogError(f"catalog {_show(path)} is a symlink: refusing to follow it; "
                           "give the real file with --catalog")
    if not stat.S_ISREG(st.st_mode):
        raise CatalogError(f"catalog {_show(path)} is not a regular file")
    if st.st_uid != os.geteuid():
        raise CatalogError(f"catalog {_show(path)} belongs to uid {st.st_uid}, not to this "
                           f"user (uid {os.geteuid()}): its owner could rewrite the record; "
                           "use a catalog of your own")
    if st.st_mode & 0o022:
        raise CatalogError(f"catalog {_show(path)} is writable by group or others (mode "
                           f"{stat.S_IMODE(st.st_mode):04o}): anyone of them could rewrite "
                           f"the record; chmod 0600 it if you trust its content")


def _wal_size(path):
    try:
        return os.lstat(path + "-wal").st_size
    except OSError:
        return 0


def _check_header(path):
    """Refuse, before SQLite sees it, a file that is empty, not SQLite, or cut short.

    SQLite takes a 0-byte file for an empty database, and one cut at a page
    boundary may pass quick_check: that would make every entry NEW.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            header, size = os.read(fd, 100), os.fstat(fd).st_size
        finally:
            os.close(fd)
    except OSError as exc:
        raise CatalogError(f"catalog {_show(path)}: {exc.strerror}") from None
    if size == 0:
        _damaged(path, "it is empty (0 bytes)")
    if len(header) < 100 or not header.startswith(_HEADER):
        _damaged(path, "it is not an SQLite database")
    if _wal_size(path):
        return      # a checkpoint cut short: the WAL still holds what the file lacks
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    # The header's page count is trusted only when its "version valid for" matches.
    if header[92:96] == header[24:28] and size < pages * page_size:
        _damaged(path, f"it is truncated: {size} bytes of {pages * page_size}")
    if page_size < 512 or size % page_size:
        _damaged(path, f"it is truncated: {size} bytes is not a whole number of pages")


def _connect(path):
    uri = "file:" + urllib.parse.quote(os.fsencode(path)) + "?mode=rw"
    try:
        con = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False,
                              timeout=BUSY_TIMEOUT)
        con.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
    except sqlite3.Error as exc:
        raise _error(path, exc) from None
    return con


def _check_content(path, con):
    """quick_check, then our tables and schema version: anything else is refused."""
    result = [row[0] for row in con.execute("PRAGMA quick_check(1)")]
    if result != ["ok"]:
        _damaged(path, f"quick_check: {'; '.join(map(str, result))}")
    if con.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
        _damaged(path, "it is an SQLite database, but not an osproject catalog")
    tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "meta" not in tables:
        _damaged(path, "it has no meta table")
    row = con.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    if row is None:
        _damaged(path, "it has no schema version")
    if row[0] != SCHEMA_VERSION:
        raise CatalogError(f"catalog {_show(path)} has schema version {row[0]}; this client "
                           f"knows version {SCHEMA_VERSION} only: use the client that wrote it")
    if not _TABLES <= tables:
        _damaged(path, f"tables missing: {', '.join(sorted(_TABLES - tables))}")


def _damaged(path, why):
    raise CatalogError(f"catalog {_show(path)} is damaged: {why}; refusing to treat it as "
                       "empty (everything would pass as NEW): restore it from a backup, or "
                       "move it aside to record a new baseline")


def _error(path, exc, writing=False):
    """A CatalogError for an SQLite failure, with what to do about it."""
    name = getattr(exc, "sqlite_errorname", "")
    doing = "cannot write" if writing else "cannot use"
    if name.startswith("SQLITE_FULL"):
        why = "the disk is full; free some space and run again"
    elif name.startswith("SQLITE_READONLY") or name.startswith("SQLITE_CANTOPEN"):
        why = (f"{exc}; the catalog and its directory must be writable by this user "
               "(or choose another with --catalog)")
    elif name.startswith("SQLITE_BUSY") or name.startswith("SQLITE_LOCKED"):
        why = f"another client held it for more than {BUSY_TIMEOUT:g} s; run again"
    elif name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return CatalogError(f"catalog {_show(path)} is damaged: {exc}; restore it from a "
                            "backup, or move it aside to record a new baseline")
    else:
        why = str(exc)
    return CatalogError(f"{doing} catalog {_show(path)}: {why}")
