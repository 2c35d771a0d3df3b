"""Event log: one logfmt line per event, to a file and to stderr.

Only the server writes it.  SIGHUP makes the loop call reopen(), so
logrotate can move the file away and the next line starts a new one.
"""

import os
import select
import sys
import time

from .protocol import PIPE_BUF

LOG_NAME = "integrity-server.log"


def format_value(value):
    """Return a logfmt value: bare when safe, else double-quoted and escaped."""
    if isinstance(value, bytes):
        text = value.decode("utf-8", "backslashreplace")
    else:
        text = str(value)
        try:   # paths arrive as fsdecoded str: show undecodable bytes as \xNN
            text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            text = text.encode("utf-8", "backslashreplace").decode("ascii")
    if text and all(c.isprintable() and c not in ' "=\\' for c in text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f'"{escaped}"'


def format_event(level, event, fields, now=None):
    """Return one logfmt line (without newline)."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
    parts = [f"ts={stamp}.{int(now % 1 * 1000):03d}Z", f"level={level}",
             f"event={event}"]
    parts += [f"{key}={format_value(val)}" for key, val in fields.items()
              if val is not None]
    return " ".join(parts)


class EventLog:
    """Append logfmt events to `<log_dir>/integrity-server.log` and stderr."""

    def __init__(self, log_dir, stream=None):
        self.path = os.path.join(log_dir, LOG_NAME)
        self.stream = sys.stderr if stream is None else stream
        os.makedirs(log_dir, exist_ok=True)
        self._file = None
        self.lost = 0                   # lines that could not be written
        self.reopen()

    def reopen(self):
        """(Re)open the log file, e.g. after logrotate moved it (SIGHUP).

        The new file is opened before the old one is closed: if it cannot be
        (the directory is gone), logging goes on into the old one.
        """
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                     | os.O_CLOEXEC, 0o640)
        old, self._file = self._file, os.fdopen(fd, "a", buffering=1, encoding="utf-8")
        if old is not None:
            old.close()

    def emit(self, level, event, **fields):
        """Write one event line to the file and to stderr."""
        line = format_event(level, event, fields) + "\n"
        try:
            self._file.write(line)
        except (OSError, ValueError):
            self.lost += 1              # a full disk must not take the server down
        self.echo(line)

    def echo(self, line):
        """Copy a line to stderr, unless that would block (nobody reads the pipe).

        select() says a pipe is writable when PIPE_BUF bytes fit, and a write
        of at most PIPE_BUF is then all or nothing, so this never blocks.
        """
        fd = self.stream.fileno() if self.stream is not None else -1
        if fd < 0:
            return
        data = line.encode("utf-8", "backslashreplace")[:PIPE_BUF]
        if not data.endswith(b"\n"):
            data = data[:-1] + b"\n"
        try:
            if select.select([], [fd], [], 0)[1]:
                os.write(fd, data)
                return
        except (OSError, ValueError):
            pass
        self.lost += 1

    def info(self, event, **fields):
        self.emit("info", event, **fields)

    def warning(self, event, **fields):
        self.emit("warning", event, **fields)

    def error(self, event, **fields):
        self.emit("error", event, **fields)

    def close(self):
        self._file.close()
