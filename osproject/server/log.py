"""Event log: one logfmt line per event, to a file, to stderr, and with
--syslog to the local syslog daemon.

Only the server writes it.  SIGHUP makes the loop call reopen(), so
logrotate can move the file away and the next line starts a new one.
"""

import os
import select
import socket
import sys
import time
from syslog import LOG_DAEMON, LOG_ERR, LOG_INFO, LOG_WARNING
from typing import Protocol

from ..protocol import PIPE_BUF

LOG_NAME = "integrity-server.log"
SYSLOG_IDENT = "integrity-server"
SYSLOG_SOCKETS = ("/dev/log", "/var/run/syslog")     # Linux, macOS
SYSLOG_LEVELS = {"info": LOG_INFO, "warning": LOG_WARNING, "error": LOG_ERR}
# macOS refuses local datagrams over 2048 bytes (net.local.dgram.maxdgram);
# a longer line (a long path, escaped) goes to syslog cut, whole to the file.
SYSLOG_MAX = 2048


class Log(Protocol):
    """What the server's parts log through: an EventLog, or a test's fake."""

    def emit(self, level: str, event: str, **fields: object) -> None: ...
    def info(self, event: str, **fields: object) -> None: ...
    def warning(self, event: str, **fields: object) -> None: ...
    def error(self, event: str, **fields: object) -> None: ...


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


def _echo_bytes(line):
    """A line as echo() writes it: at most PIPE_BUF bytes, ending in a newline."""
    data = line.encode("utf-8", "backslashreplace")[:PIPE_BUF]
    if not data.endswith(b"\n"):
        data = data[:-1] + b"\n"
    return data


class SyslogError(Exception):
    """--syslog cannot work: no syslog daemon listens where we would send."""


class Syslog:
    """Send lines to the local syslog daemon as facility daemon, never waiting.

    Not the `syslog` module: it calls the C library's syslog(), which (glibc)
    sends on a blocking socket connected to /dev/log, and a send blocks while
    the daemon's queue is full (journald or rsyslog busy, stopped, wedged):
    the whole select() loop would stall with it.  Our own socket is non-blocking,
    so a line that does not fit is dropped and counted (the log file still
    has it).  It is not connected either: each line is sent to the path, so a
    restarted daemon's new socket is found without reconnecting.
    """

    def __init__(self, path=None):
        self.path = path or find_syslog_socket()
        probe(self.path)
        self.prefix = f"{SYSLOG_IDENT}[{os.getpid()}]: "
        self.dropped = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # close-on-exec
        self._sock.setblocking(False)

    def send(self, level, line):
        """Send one line as `<PRI>integrity-server[PID]: line`, or count it dropped."""
        priority = LOG_DAEMON | SYSLOG_LEVELS[level]
        data = f"<{priority}>{self.prefix}{line}".encode("utf-8", "backslashreplace")
        data = data[:SYSLOG_MAX]
        try:
            self._sock.sendto(data, self.path)
        except OSError:                 # EAGAIN/ENOBUFS: queue full; ECONNREFUSED: gone
            self.dropped += 1

    def close(self):
        self._sock.close()


def find_syslog_socket():
    """The local syslog socket of this system; raise SyslogError if there is none."""
    for path in SYSLOG_SOCKETS:
        if os.path.exists(path):
            return path
    raise SyslogError(f"no syslog socket ({' or '.join(SYSLOG_SOCKETS)}); is a syslog "
                      "daemon running? --syslog-socket PATH names another")


def probe(path):
    """Raise SyslogError unless a datagram socket at `path` has a reader."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(path)
        except OSError as exc:
            raise SyslogError(f"cannot send to {path}: {exc.strerror or exc}") from None


class EventLog:
    """Append logfmt events to `<log_dir>/integrity-server.log`, stderr and,
    if given a Syslog, to syslog."""

    def __init__(self, log_dir, stream=None, syslog=None):
        self.path = os.path.abspath(os.path.join(log_dir, LOG_NAME))
        self.stream = sys.stderr if stream is None else stream
        self.syslog = syslog
        os.makedirs(log_dir, exist_ok=True)
        self._fd = -1
        self._torn = False              # a short write left a line without its newline
        self.lost = 0                   # lines that could not be written
        self._held = None               # lines emitted since the last flush(), if held
        self.reopen()

    def reopen(self):
        """(Re)open the log file, e.g. after logrotate moved it (SIGHUP).

        The new file is opened before the old one is closed: if it cannot be
        (the directory is gone), logging goes on into the old one.
        """
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                     | os.O_CLOEXEC, 0o640)
        if self._fd >= 0:
            self.flush()                # what came before the SIGHUP, to the old file
        old, self._fd = self._fd, fd
        if old >= 0:
            os.close(old)

    def hold(self) -> None:
        """From now on, keep the file's and stderr's lines until flush().

        The server's loop flushes once per pass, before it waits again: a
        first run logs thousands of lines, and one write(2) each, to the
        file and to stderr (with a select() each), cost more than the rest
        of their pass.  Syslog still gets each line as it comes.
        """
        if self._held is None:
            self._held = []

    def emit(self, level: str, event: str, **fields: object) -> None:
        """Write one event line to the file, to stderr and to syslog."""
        line = format_event(level, event, fields)
        if self._held is not None:
            self._held.append(line + "\n")
        else:
            self.append(line + "\n")
            self.echo(line + "\n")
        if self.syslog is not None:
            self.syslog.send(level, line)

    def flush(self):
        """Write the lines held since the last flush: one write(2) to the file,
        and to stderr as few writes of at most PIPE_BUF as they fit in."""
        if not self._held:
            return
        lines, self._held = self._held, []
        self.append_all(lines)
        chunk = b""
        for line in lines:
            data = _echo_bytes(line)
            if len(chunk) + len(data) > PIPE_BUF:
                self.echo_bytes(chunk, chunk.count(b"\n"))
                chunk = b""
            chunk += data
        self.echo_bytes(chunk, chunk.count(b"\n"))

    def append_all(self, lines):
        """append() of many lines in one write(2); after a short one, line by line."""
        data, written = self._put("".join(lines))
        if written == len(data):
            self._torn = False
            return
        done = data[:written].count(b"\n") - (1 if self._torn and written else 0)
        if written and not data[:written].endswith(b"\n"):
            self.lost += 1                  # the line cut short
            self._torn = True
            done += 1
        elif written:
            self._torn = False
        for line in lines[max(done, 0):]:
            self.append(line)

    def _put(self, text):
        """One write(2) of text, after a newline ending a line cut short
        before; return (the bytes meant, how many of them were written)."""
        data = text.encode("utf-8", "backslashreplace")
        if self._torn:
            data = b"\n" + data
        try:
            return data, os.write(self._fd, data)
        except OSError:
            return data, 0

    def append(self, line):
        """Write one line to the file in one write(2), or count it lost.

        Unbuffered: with a full disk (ENOSPC) a buffer would keep the lines
        that failed and fail again at close, so shutdown would fail on them.
        A line cut short by the disk filling up is ended before the next.
        """
        data, written = self._put(line)
        if written == len(data):
            self._torn = False
        else:
            self.lost += 1              # a full disk must not take the server down
            self._torn = self._torn or written > 0

    @property
    def unsent(self):
        """Lines syslog did not take (its queue was full)."""
        return self.syslog.dropped if self.syslog is not None else 0

    def echo(self, line):
        """Copy a line to stderr, unless that would block (nobody reads the pipe).

        select() says a pipe is writable when PIPE_BUF bytes fit, and a write
        of at most PIPE_BUF is then all or nothing, so this never blocks.
        """
        self.echo_bytes(_echo_bytes(line), 1)

    def echo_bytes(self, data, lines):
        """echo() of `lines` whole lines, at most PIPE_BUF bytes in all."""
        fd = self.stream.fileno() if self.stream is not None else -1
        if fd < 0 or not data:
            return
        try:
            if select.select([], [fd], [], 0)[1]:
                os.write(fd, data)
                return
        except (OSError, ValueError):
            pass
        self.lost += lines

    def info(self, event: str, **fields: object) -> None:
        self.emit("info", event, **fields)

    def warning(self, event: str, **fields: object) -> None:
        self.emit("warning", event, **fields)

    def error(self, event: str, **fields: object) -> None:
        self.emit("error", event, **fields)

    def close(self):
        self.flush()
        try:
            os.close(self._fd)
        except OSError:                 # never: the data went out with each write
            pass
        if self.syslog is not None:
            self.syslog.close()
