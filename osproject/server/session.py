"""A client's session on the server side: its two private FIFOs and their buffers."""

import errno
import os
import re
import stat

from .. import protocol
from .verifier import Vote

MAX_OUTPUT = 4 * 1024 * 1024   # a client that stops reading is dropped past this
REPLIES_PER_FRAME = 50         # verdicts are ~150 bytes: a frame stays far below MAX_FRAME
READ_SIZE = 64 * 1024
_MD5 = re.compile(r"[0-9a-f]{32}")


class Refused(Exception):
    """A hello or a request the server will not serve; str() says why."""


def open_client_fifo(path, flags):
    """Open a client's FIFO without blocking and without following links.

    The path is lstat'ed first, so /dev/null, a regular file or a symlink is
    never even opened, then fstat'ed after the open to be sure it is the very
    FIFO we checked, owned by our own uid.
    """
    try:
        before = os.lstat(path)
    except OSError as exc:
        raise Refused(f"{exc.strerror}: {path}") from None
    _check_fifo(before, path)
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise Refused(f"nobody reads {path}") from None
        raise Refused(f"{exc.strerror}: {path}") from None
    after = os.fstat(fd)
    if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
        os.close(fd)
        raise Refused(f"{path} was swapped while it was opened")
    return fd


def _check_fifo(st, path):
    if not stat.S_ISFIFO(st.st_mode):
        raise Refused(f"not a FIFO: {path}")
    if st.st_uid != os.geteuid():
        raise Refused(f"FIFO {path} belongs to uid {st.st_uid}, not to us")


class Session:
    """Reads requests from a client's request FIFO, buffers replies to its reply FIFO."""

    def __init__(self, sid, request_fifo, reply_fifo):
        self.sid = sid
        self.reply_path = reply_fifo
        self.reply_fd = open_client_fifo(reply_fifo, os.O_WRONLY)
        self.uid = os.fstat(self.reply_fd).st_uid     # our own: others are refused
        try:
            self.request_fd = open_client_fifo(request_fifo, os.O_RDONLY)
        except Refused:
            os.close(self.reply_fd)
            raise
        self.lines = protocol.LineBuffer()
        self.outbuf = bytearray()
        self.eof = False          # the client closed its request FIFO
        self.dead = False         # gone or dropped: replies go nowhere
        self.outstanding = 0      # jobs whose verdict is not sent yet
        self.replies = []         # verdicts of this loop pass, sent together by pack()
        self.said_bye = False
        self.files = 0
        self.counts = {}
        self.unchecked = Unchecked()
        self.heard_at = 0.0       # when the client last sent something (server's clock)
        self.pid = None           # the client's, as its hello says
        self.spare = False        # admitted past MAX_SESSIONS: for --status only

    def read(self):
        """Return the request frames now readable; set eof when the client is done.

        Raises Refused for a frame that is not a valid request.
        """
        if self.dead:
            return []
        try:
            data = os.read(self.request_fd, READ_SIZE)
        except BlockingIOError:
            return []
        if not data:
            self.eof = True
            if self.lines.pending:
                raise Refused("request torn at end of file")
            return []
        frames = []
        for line in self.lines.feed(data):
            if line is None:
                raise Refused("request frame too long")
            frames.append(validate_request(protocol.decode(line)))
        return frames

    def send(self, frame):
        """Queue a reply; drop the client if it lets too much pile up."""
        if self.dead:
            return
        self.outbuf += protocol.encode(frame)
        if len(self.outbuf) > MAX_OUTPUT:
            self.dead = True
            self.outbuf.clear()
            raise Refused(f"client read nothing of {MAX_OUTPUT} bytes of replies")

    def reply(self, verdict):
        """Queue one file's verdict; a loop pass's verdicts leave as one frame."""
        if not self.dead:
            self.replies.append(verdict)

    def pack(self):
        """Frame the queued verdicts (raises Refused like send)."""
        while self.replies:
            batch = self.replies[:REPLIES_PER_FRAME]
            del self.replies[:REPLIES_PER_FRAME]
            self.send({"replies": batch})

    def flush(self):
        """Write what the reply FIFO takes now; mark the session dead on EPIPE."""
        if self.dead or not self.outbuf:
            return
        try:
            sent = os.write(self.reply_fd, self.outbuf)
        except BlockingIOError:
            return
        except OSError:
            self.dead = True
            self.outbuf.clear()
            return
        del self.outbuf[:sent]

    def say_goodbye(self, reason):
        """Queue {"error": reason}, the session's last frame, and write what the
        reply FIFO takes now: best effort, a client that reads nothing misses it."""
        if self.dead:
            return
        self.outbuf += protocol.encode({"error": reason})
        self.flush()

    def count(self, status):
        self.counts[status] = self.counts.get(status, 0) + 1

    def close(self):
        """Close both FIFOs; a handler still queued for them in this pass sees dead."""
        self.dead = True
        for fd in (self.request_fd, self.reply_fd):
            if fd >= 0:
                os.close(fd)
        self.request_fd = self.reply_fd = -1


class Unchecked:
    """Hashes a worker gave that nobody cross-checked, kept for re-verification.

    If that worker is caught lying during the session, they are checked
    again.  Packed into one bytearray per worker, NUL-terminated fields (a
    path never holds a NUL), about 150 bytes a file instead of a kilobyte of
    objects: on a first run this is the only server state that grows with
    the tree.
    """

    FIELDS = 11

    def __init__(self):
        self._by_wid = {}
        self._slots = {}            # wid -> its slot, once per worker, for the log

    def add(self, path, sidecar, directory, vote):
        self._slots[vote.wid] = vote.slot
        packed = self._by_wid.setdefault(vote.wid, bytearray())
        size, mtime, ctime, ino = vote.stat
        for field in (path, sidecar or "", vote.md5):
            packed += os.fsencode(field) + b"\0"
        packed += b"%d\0%d\0%d\0%d\0%d\0%d\0%d\0%d\0" % (
            *(directory or (-1, -1)), size, mtime, ctime, ino, vote.racy, vote.pid)

    def pop(self, wid):
        """Return and forget [(path, sidecar, directory, Vote)] of worker `wid`."""
        fields = bytes(self._by_wid.pop(wid, b"")).split(b"\0")[:-1]
        slot = self._slots.pop(wid, None)
        entries = []
        for i in range(0, len(fields), self.FIELDS):
            path, sidecar, md5, *numbers = fields[i:i + self.FIELDS]
            dev, dir_ino, size, mtime, ctime, ino, racy, pid = map(int, numbers)
            entries.append((os.fsdecode(path), os.fsdecode(sidecar) or None, (dev, dir_ino),
                            Vote(wid, md5.decode("ascii"), (size, mtime, ctime, ino),
                                 bool(racy), pid, slot)))
        return entries


AUDIT_EVENTS = ("file.changed", "file.missing", "file.moved")
_FIELD = re.compile(r"[a-z][a-z0-9_]{0,31}")


def validate_request(frame):
    """Check a client request; return it, or raise Refused."""
    if frame.get("status") is True and len(frame) == 1:
        return frame                    # integrity-client --status
    if "audit" in frame and len(frame) == 1:
        return validate_audit(frame)
    if "roots" in frame:                # what the client checks, for the log
        roots, count = frame["roots"], frame.get("count")
        if not (isinstance(roots, list) and len(roots) <= protocol.MAX_ROOTS
                and all(protocol.is_absolute_path(r) for r in roots)
                and type(count) is int and count >= len(roots)):
            raise Refused("roots: a list of absolute paths, and their count")
        return frame
    files = frame.get("files")
    if not isinstance(frame.get("id"), int) or not isinstance(files, list) \
            or not 0 < len(files) <= protocol.MAX_PATHS:
        raise Refused("a request has an id and 1 to 5 files")
    for item in files:
        if not isinstance(item, dict) or item.get("kind") not in ("check", "missing"):
            raise Refused("a file entry needs kind check or missing")
        if not protocol.is_absolute_path(item.get("path")):
            raise Refused("a file entry needs an absolute path")
        if not (protocol.is_absolute_path(item.get("sidecar"))
                or item.get("sidecar") is None and item["kind"] == "check"):
            raise Refused("a file entry needs an absolute sidecar (or null: none)")
        if not isinstance(item.get("size", 0), int):
            raise Refused("size must be an integer")
        identity = item.get("dir")      # without one, the worker reads nothing
        if identity is not None and not (isinstance(identity, list) and len(identity) == 2
                                         and all(type(n) is int for n in identity)):
            raise Refused("dir must be its directory's [st_dev, st_ino]")
        expected = item.get("expected")
        if expected is not None and not (isinstance(expected, str)
                                         and _MD5.fullmatch(expected)):
            raise Refused("expected must be 32 lowercase hex digits")
    return frame


def validate_audit(frame):
    """An audit frame: the alterations a client found, for the log (see client.py)."""
    events = frame["audit"]
    if not isinstance(events, list) or not 0 < len(events) <= 100:
        raise Refused("an audit frame has 1 to 100 events")
    for event in events:
        if not isinstance(event, dict) or event.get("event") not in AUDIT_EVENTS:
            raise Refused(f"an audit event is one of {', '.join(AUDIT_EVENTS)}")
        for key, value in event.items():
            if not _FIELD.fullmatch(key) or key == "session" \
                    or not isinstance(value, (str, int)) or isinstance(value, bool):
                raise Refused("audit fields are lowercase names with a string or number")
    return frame
