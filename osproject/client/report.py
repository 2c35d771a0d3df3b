"""What the client tells its user: the findings, sorted by path, and a summary.

Every result is held until the run is over: results a single worker gave
with nobody cross-checking them may still be corrected by the server (if
that worker is caught lying later in the session, no wrong hash reaches
the user or the catalog), a MISSING file and a NEW one with the same
content are one MOVED, and the report is sorted by path so that two
nights' reports diff cleanly.  Results wait in sorted runs in an unlinked
temp file, merged at the end, so a run over millions of files costs disk,
not RSS.  They are pickled there: the file is our own.
"""

import heapq
import json
import os
import pickle
import struct
import tempfile
import threading
from typing import IO

from ..statuses import (
    CHANGED,
    ERROR,
    EXIT_ALTERED,
    EXIT_OK,
    EXIT_TROUBLE,
    MISSING,
    MOVED,
    NEW,
    OK,
    STATUSES,
    UNSTABLE,
)
from . import catalog
from .findings import Finding

RUN_LENGTH = 2000           # findings sorted in memory before they go to disk
READ_AHEAD = 8192           # bytes of each run read at a time when they are merged
_LENGTH = struct.Struct("<I")   # before each record on disk: its pickle's length


def show_path(path):
    """A path for a terminal: control characters and undecodable bytes escaped,
    and a backslash doubled, so that `a<newline>b` and `a\\nb` never look alike."""
    text = os.fsencode(path).decode("utf-8", "surrogateescape")
    return "".join(_shown(c) for c in text)


def _shown(char):
    if char == "\\":
        return "\\\\"
    if "\udc80" <= char <= "\udcff":                 # a byte that is not UTF-8
        return f"\\x{ord(char) - 0xdc00:02x}"
    return char if char.isprintable() else repr(char)[1:-1]


def sort_key(path):
    """Paths in tree order: a directory's entries right after it ("a", "a/b", "a-b")."""
    return os.fsencode(path).split(b"/")


class Report:
    def __init__(self, out, as_json=False, progress=None):
        self.out = out
        self.as_json = as_json
        self.counts_only = not as_json  # an entry as recorded is counted, nothing more
        self.progress = progress    # a Progress line to clear before printing, or None
        self.counts = dict.fromkeys(STATUSES, 0)
        self.received = 0           # results in
        self.altered = 0            # findings that make the run exit 1
        self.first_seen = 0         # entries recorded on a root's first check
        self.files_verified = 0     # regular files whose content was judged
        self.unverifiable = 0       # files (or roots) that could not be
        self._runs = _SortedRuns()
        self._verdicts = {}         # key -> the corrected (status, md5, error)
        self._moves = _Moves()
        self._lock = threading.Lock()
        self.out_closed = False     # the reader of our output went away

    def add(self, finding):
        """Hold one entry's Finding until the end; called from any thread.

        On a terminal, an entry that is as recorded is only counted: nothing
        of it would be printed, recorded or corrected, so a clean verify
        holds (and pickles, and sorts) nothing at all.
        """
        with self._lock:
            self.received += 1
            if self.counts_only and _silent(finding):
                self._count(finding)
                return
            self._moves.note(finding)
            self._runs.add(sort_key(finding.path), finding)

    def add_as_recorded(self, files=1):
        """Count files found as recorded (findings.as_recorded), under a root
        the catalog knew: what add() does with their Findings on a terminal."""
        with self._lock:
            self.received += files
            self.counts[OK] += files
            self.files_verified += files

    def correct(self, key, status, md5, error=None):
        """The server re-checked a held result and found the first hash wrong."""
        with self._lock:
            self._verdicts[key] = (status, md5, error)

    def release(self, accept=lambda finding, audit=True: None):
        """Print the findings in path order, each passed to accept() first
        (which records it in the catalog)."""
        from .findings import corrected
        with self._lock:
            self._clear_progress()
            self._moves.pair(self._verdicts)
            folder = _Folder(self._write) if not self.as_json else None
            for finding in self._runs.drain():
                if finding.key in self._verdicts and finding.unchecked:
                    finding = corrected(finding, *self._verdicts[finding.key])
                moved = self._moves.of(finding)
                if moved is _FOLDED:
                    accept(finding, audit=False)    # the arrival of a MOVED: told there
                    continue
                if moved is not None:
                    finding = as_moved(finding, *moved)
                accept(finding)
                self._count(finding)
                if folder is None:      # as JSON
                    self._write(json.dumps(as_record(finding)) + "\n")
                else:
                    folder.show(finding)
            if folder is not None:
                folder.close()

    def _write(self, text):
        """Write to the output; a reader gone (`| head`) costs the output only,
        never the run: the catalog still records, the exit status still tells."""
        if self.out_closed:
            return
        try:
            self.out.write(text)
        except BrokenPipeError:
            self.out_closed = True

    def _count(self, finding):
        self.counts[finding.status] += 1
        if finding.status in (ERROR, UNSTABLE):
            self.unverifiable += finding.now is None or finding.now.kind == catalog.FILE
        elif finding.now is not None and finding.now.kind == catalog.FILE:
            self.files_verified += 1
        self.altered += finding.altered or finding.status == MOVED
        if not finding.covered and finding.status in (NEW, OK) and finding.stage is not None:
            self.first_seen += 1

    def show_progress(self, listed):
        """Redraw the progress line, if there is one."""
        if self.progress is not None:
            with self._lock:
                self.progress.draw(listed, self.received)

    def summary(self, recorded=None):
        """Print the summary line; return the exit status."""
        with self._lock:
            self._clear_progress()
            counts = {k: v for k, v in self.counts.items() if v}
            total = sum(counts.values())
            if self.as_json:
                self._write(json.dumps({"summary": counts, "entries": total,
                                        "files": self.files_verified + self.unverifiable})
                            + "\n")
            else:
                if self.first_seen:
                    self._write(f"{_entries(self.first_seen)} seen for the first time "
                                   "recorded in the catalog (--json lists them)\n")
                parts = ", ".join(f"{v} {k}" for k, v in counts.items()) or "nothing"
                self._write(f"{_entries(total)}: {parts}\n")
            try:
                if not self.out_closed:
                    self.out.flush()
            except BrokenPipeError:
                self.out_closed = True
        return self.exit_status()

    def exit_status(self):
        """0 nothing altered, 1 an alteration (or a recorded file not verified),
        2 nothing could be verified at all (an unreadable root, every file ERROR)."""
        if self.unverifiable and not self.files_verified:
            return EXIT_TROUBLE
        return EXIT_ALTERED if self.altered else EXIT_OK

    def _clear_progress(self):
        if self.progress is not None:
            self.progress.clear()
            self.progress = None

    def abandon(self):
        """The run is over without a summary: take the progress line away.

        Without the lock: a checker thread may hold it, and this is the end.
        """
        if self.progress is not None:
            self.progress.clear()

    def flush(self):
        with self._lock:
            self._clear_progress()
            self.out.flush()


def _silent(finding):
    return (finding.status == OK and finding.covered and finding.stage is None
            and not finding.unchecked and not finding.forget and not finding.repair)


def as_moved(gone, new_path, new_key, new_now):
    """The MISSING half of a move, become the MOVED finding: what moved with it
    (a setuid bit added on the way) is compared too."""
    changes = tuple(catalog.compare(gone.was, new_now))
    return gone._replace(status=MOVED, now=new_now, changes=changes, moved_to=new_path,
                         moved_key=new_key, forget=gone.forget)


def as_record(finding):
    """The --json object of one finding."""
    shape = finding.now or finding.was
    record = {"path": finding.path, "kind": shape.kind if shape else None,
              "status": finding.status, "md5": finding.md5,
              "expected": finding.expected, "error": finding.error,
              "updated": finding.updated or None, "to": finding.moved_to}
    if finding.changes:
        record["changes"] = [c.attribute for c in finding.changes]
    if finding.changes or finding.status in (MISSING, MOVED, CHANGED):
        record["was"] = catalog.as_json(finding.was) if finding.was else None
        record["now"] = catalog.as_json(finding.now) if finding.now else None
    return {k: v for k, v in record.items() if v is not None}


def format_human(finding, below=0):
    """One finding's line for a terminal; `below`: entries folded into it."""
    line = f"{finding.status:<8} {show_path(finding.path)}"
    if finding.moved_to is not None:
        line += f" -> {show_path(finding.moved_to)}"
    notes = [f"a directory, and {_entries(below)} below it"] if below else []
    if finding.status in (CHANGED, MOVED) and catalog.is_alteration(finding.changes):
        notes.append(catalog.describe(finding.changes, finding.was, finding.now))
    if finding.error:
        notes.append(finding.error)
    if finding.updated:
        notes.append("baseline removed" if finding.status == MISSING else "baseline updated")
    return line + (f"  ({'; '.join(notes)})" if notes else "")


def _entries(count):
    return f"{count} entry" if count == 1 else f"{count} entries"


_FOLDED = object()


class _Moves:
    """MISSING regular files and NEW ones of the same size and content: MOVED.

    Only files the catalog knew can go missing, and only files new under a
    known root are additions, so this holds findings, which are few.  An
    empty file never counts as moved: all empty files look alike.
    """

    def __init__(self):
        self.gone, self.new = {}, {}    # key -> ((md5, size), path)
        self.old_to_new, self.new_to_old = {}, {}

    def note(self, finding):
        if finding.status == MISSING and finding.was is not None \
                and finding.was.kind == catalog.FILE and finding.was.size and finding.was.md5:
            self.gone[finding.key] = ((finding.was.md5, finding.was.size), finding.path)
        elif finding.status == NEW and finding.covered and finding.now is not None \
                and finding.now.kind == catalog.FILE and finding.now.size and finding.md5:
            self.new[finding.key] = ((finding.md5, finding.now.size), finding.path,
                                     finding.now)

    def pair(self, verdicts):
        """Match them up, once the server's corrections are known."""
        by_content: dict[tuple[str, int], list[tuple[str, str, catalog.Record]]] = {}
        for key, (content, path, now) in sorted(self.new.items()):
            if key in verdicts:
                status, md5, _ = verdicts[key]
                if md5 is None:
                    continue
                content, now = (md5, content[1]), now._replace(md5=md5)
            by_content.setdefault(content, []).append((key, path, now))
        for key, (content, _path) in sorted(self.gone.items()):
            candidates = by_content.get(content)
            if candidates:
                new_key, new_path, new_now = candidates.pop(0)
                self.old_to_new[key] = (new_path, new_key, new_now)
                self.new_to_old[new_key] = key

    def of(self, finding):
        """(new path, key, Record) of a moved file, _FOLDED for its arrival, else None."""
        if finding.status == MISSING and finding.key in self.old_to_new:
            return self.old_to_new[finding.key]
        if finding.status == NEW and finding.key in self.new_to_old:
            return _FOLDED
        return None


class _Folder:
    """Human lines: OK and first-seen entries are not shown, and the entries
    below a MISSING directory fold into its line with a count."""

    def __init__(self, write):
        self._write = write
        self.gone_dir = None        # (finding, its sort key, entries below it)

    def show(self, finding):
        if self.gone_dir is not None:
            directory, key, below = self.gone_dir
            if finding.status == MISSING and sort_key(finding.path)[:len(key)] == key:
                self.gone_dir = (directory, key, below + 1)
                return
            self.close()
        if finding.status == OK or (finding.status == NEW and not finding.covered
                                    and not finding.error):
            return
        if finding.status == MISSING and finding.was is not None \
                and finding.was.kind == catalog.DIR:
            self.gone_dir = (finding, sort_key(finding.path), 0)
            return
        self._write(format_human(finding) + "\n")

    def close(self):
        if self.gone_dir is None:
            return
        directory, _, below = self.gone_dir
        self.gone_dir = None
        self._write(format_human(directory, below=below) + "\n")


class _SortedRuns:
    """Findings by sort key: sorted runs of RUN_LENGTH in a temp file, merged."""

    def __init__(self):
        self.run = []
        self.file: IO[bytes] | None = None
        self.spans: list[tuple[int, int]] = []   # (start, end) of each run on disk

    def add(self, key, finding):
        self.run.append((key, finding))
        if len(self.run) >= RUN_LENGTH:
            self._spill()

    def _spill(self):
        if self.file is None:
            self.file = tempfile.TemporaryFile()
        self.file.seek(0, os.SEEK_END)
        self.run.sort(key=lambda pair: pair[0])
        offset = self.file.tell()
        # One pickle per record, after its length: each run is read back
        # READ_AHEAD bytes at a time, so a merge of many runs holds a few
        # records of each.  Plain tuples, not the named ones: pickled in C,
        # with no __reduce__ call per Record, twice as fast.
        write, pack, dumps = self.file.write, _LENGTH.pack, pickle.dumps
        for key, finding in self.run:
            data = dumps((key, _flat(finding)), pickle.HIGHEST_PROTOCOL)
            write(pack(len(data)))
            write(data)
        self.file.flush()           # read back with pread(2), past the buffer
        self.spans.append((offset, self.file.tell()))
        self.run = []

    def drain(self):
        """Yield every finding in key order, then forget them all."""
        if self.file is None:
            self.run.sort(key=lambda pair: pair[0])
            run, self.run = self.run, []
            yield from (finding for _, finding in run)
            return
        if self.run:
            self._spill()
        streams = [self._read(start, end) for start, end in self.spans]
        for _, finding in heapq.merge(*streams, key=lambda pair: pair[0]):
            yield finding
        self.file.close()
        self.file, self.spans = None, []

    def _read(self, start, end):
        """Yield the (key, finding) pairs of the run at start..end of the file."""
        assert self.file is not None, "runs are read only while the file is open"
        fd = self.file.fileno()
        buf, pos = b"", 0
        while start < end or pos < len(buf):
            buf, pos, start = _ahead(fd, buf, pos, start, end, _LENGTH.size)
            (size,) = _LENGTH.unpack_from(buf, pos)
            buf, pos, start = _ahead(fd, buf, pos, start, end, _LENGTH.size + size)
            pos += _LENGTH.size
            key, flat = pickle.loads(buf[pos:pos + size])
            pos += size
            yield key, _unflat(flat)


def _ahead(fd, buf, pos, start, end, need):
    """Make buf[pos:] hold `need` bytes, reading on from `start`; return
    (buf, pos, start) as they are then."""
    if len(buf) - pos >= need:
        return buf, pos, start
    parts = [buf[pos:]]
    have = len(parts[0])
    while have < need:
        data = os.pread(fd, min(max(need - have, READ_AHEAD), end - start), start)
        if not data:
            raise EOFError("the findings' temp file is cut short")
        parts.append(data)
        have += len(data)
        start += len(data)
    return b"".join(parts), 0, start


def _flat(finding):
    """A Finding as nested plain tuples (see _unflat)."""
    was, now, stage = finding.was, finding.now, finding.stage
    return (*finding[:6], tuple(tuple(c) for c in finding.changes),
            was and tuple(was), now and tuple(now), stage and tuple(stage), *finding[10:])


def _unflat(flat):
    """The Finding _flat() made `flat` of."""
    was, now, stage = flat[7:10]
    return Finding._make((*flat[:6], tuple(catalog.Change(*c) for c in flat[6]),
                          was and catalog.Record(*was), now and catalog.Record(*now),
                          stage and catalog.Record(*stage), *flat[10:]))


STATUS_COLUMNS = ("slot", "state", "pid", "uptime", "files", "warnings", "rss", "cpu",
                  "forks")


def format_status(status):
    """The --status table, like supervisorctl status: a header line, one
    aligned row per worker slot, and the totals of the server's life."""
    head = (f"integrity-server pid {status['pid']}, uptime {format_uptime(status['uptime'])}, "
            f"rss {format_cell('rss', status.get('rss'))}, "
            f"cpu {format_cell('cpu', status.get('cpu'))}, "
            f"{status['clients']} other client(s), {status['waiting']} file(s) waiting")
    rows = [[name.upper() for name in STATUS_COLUMNS]]
    rows += [[format_cell(name, w.get(name)) for name in STATUS_COLUMNS]
             for w in status["workers"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(STATUS_COLUMNS))]
    table = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    t = status["totals"]
    tail = (f"totals: {t['files']} files done, {t['warnings']} warnings, "
            f"{t['bans']} bans, {t['reforks']} re-forks")
    return "\n".join([head, *table, tail]) + "\n"


def format_cell(name, value):
    """One value of the status table; "-" where there is none (no process)."""
    if value is None:
        return "-"
    if name == "uptime":
        return format_uptime(value)
    if name == "rss":
        return f"{value / 2**20:.1f}M"
    if name == "cpu":
        return f"{value:.2f}s"
    return str(value)


def format_uptime(seconds):
    """H:MM:SS, with days in front past one, as supervisorctl shows uptimes."""
    days, rest = divmod(int(seconds), 86400)
    clock = f"{rest // 3600}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {clock}" if days else clock
