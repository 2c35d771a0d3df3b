"""What the client tells its user: a line per file that is not OK, and a summary.

Results a single worker gave with nobody cross-checking them are held back
until the server has said bye: if that worker is caught lying later in the
session, the server re-checks them and sends corrections, so no wrong hash
reaches the user.  Held results wait in an unlinked temp file, not in
memory, so a first run on millions of files costs disk, not RSS.  They are
pickled there: the file is our own, and pickle is nearly twice as fast as
JSON at this, which shows on a first run, where nearly every result is held.
"""

import json
import os
import pickle
import tempfile
import threading

from .verifier import CHANGED, ERROR, MISSING, OK, STATUSES, UNSTABLE

EXIT_OK, EXIT_ALTERED, EXIT_TROUBLE = 0, 1, 2


def show_path(path):
    """A path for a terminal: control characters and undecodable bytes escaped."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class Report:
    def __init__(self, out, as_json=False, progress=None):
        self.out = out
        self.as_json = as_json
        self.progress = progress    # a Progress line to clear before printing, or None
        self.counts = dict.fromkeys(STATUSES, 0)
        self.received = 0           # results in, held or not
        self.unverified = 0         # files with a baseline that could not be verified
        self._held = None           # temp file of records awaiting the bye
        self._verdicts = {}         # key -> the corrected status and md5
        self._lock = threading.Lock()

    def add(self, path, status, md5=None, expected=None, error=None, updated=False,
            unchecked=False, key=None):
        """Record one file's result; called from any checker thread.

        An unchecked result is held under `key` (the absolute path the server
        knows it by) until finish(), corrected if correct() was called.
        """
        record = {"path": path, "status": status, "md5": md5,
                  "expected": expected, "error": error, "updated": updated or None}
        with self._lock:
            self.received += 1
            if unchecked:
                self._hold(key or path, record)
            else:
                self._emit(record)

    def _hold(self, key, record):
        if self._held is None:
            self._held = tempfile.TemporaryFile()
        pickle.dump((key, record), self._held)

    def correct(self, key, status, md5, error=None):
        """The server re-checked a held result and found the first hash wrong."""
        with self._lock:
            self._verdicts[key] = {"status": status, "md5": md5, "error": error}

    def release(self):
        """Emit the held results, corrected where the server said so."""
        if self._held is None:
            return
        self._held.seek(0)
        while True:
            try:
                # A fresh unpickler each time: one kept for the whole file would
                # keep every record in its memo (its MEMOIZE slots only grow).
                key, record = pickle.load(self._held)
            except EOFError:
                break
            record.update(self._verdicts.get(key, {}))
            self._emit(record)
        self._held.close()
        self._held = None

    def show_progress(self, listed):
        """Redraw the progress line, if there is one."""
        if self.progress is not None:
            with self._lock:
                self.progress.draw(listed, self.received)

    def finish(self):
        """Emit what is still held, then the summary; return the exit status."""
        with self._lock:
            if self.progress is not None:
                self.progress.clear()
                self.progress = None
            self.release()
            counts = {k: v for k, v in self.counts.items() if v}
            if self.as_json:
                self.out.write(json.dumps({"summary": counts}) + "\n")
            else:
                total = sum(counts.values())
                parts = ", ".join(f"{v} {k}" for k, v in counts.items()) or "nothing"
                self.out.write(f"{total} files: {parts}\n")
            self.out.flush()
        altered = self.counts[CHANGED] or self.counts[MISSING] or self.unverified
        return EXIT_ALTERED if altered else EXIT_OK

    def _emit(self, record):
        self.counts[record["status"]] += 1
        if record["status"] in (ERROR, UNSTABLE) and record["expected"] is not None:
            self.unverified += 1    # a hidden change looks like this: never exit 0
        if self.progress is not None and (self.as_json or record["status"] != OK):
            self.progress.clear()
        if self.as_json:
            self.out.write(json.dumps({k: v for k, v in record.items()
                                       if v is not None}) + "\n")
        elif record["status"] != OK:
            self.out.write(format_human(record) + "\n")

    def abandon(self):
        """The run is over without a summary: take the progress line away.

        Without the lock: a checker thread may hold it, and this is the end.
        """
        if self.progress is not None:
            self.progress.clear()

    def flush(self):
        with self._lock:
            if self.progress is not None:
                self.progress.clear()
            self.out.flush()


def format_human(record):
    line = f"{record['status']:<8} {show_path(record['path'])}"
    notes = []
    if record["status"] == CHANGED:
        notes.append(f"expected {record['expected']}, got {record['md5']}")
    if record.get("error"):
        notes.append(record["error"])
    if record.get("updated"):
        notes.append("baseline removed" if record["status"] == MISSING
                     else "baseline updated")
    return line + (f"  ({'; '.join(notes)})" if notes else "")


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
    table = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
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
