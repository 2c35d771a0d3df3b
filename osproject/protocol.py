"""Wire format: one JSON object per line, on pipes and FIFOs alike.

JSON with ensure_ascii escapes every control character and every byte that
is not ASCII, so a frame never contains a raw newline whatever the file
names hold.  Names that are not UTF-8 travel as os.fsdecode() strings
(surrogateescape); JSON carries the lone surrogates as \\udcXX and
os.fsencode() restores the original bytes on the other side.

The server may end a session with `{"error": REASON}`, in place of the
welcome or of the bye: the client reports REASON and exits 2.
"""

import json
import os
import select

# POSIX guarantees atomic writes up to PIPE_BUF: 4096 on Linux, 512 on macOS.
PIPE_BUF = getattr(select, "PIPE_BUF", 512)
# A hello must never interleave with another client's, on any system: keep it
# within _POSIX_PIPE_BUF, the least PIPE_BUF POSIX allows.
HELLO_MAX = min(PIPE_BUF, 512)
# A frame holds at most 5 files, each a path and a sidecar path of up to
# PATH_MAX bytes, and JSON spells a byte that is not UTF-8 in 6 characters.
MAX_FRAME = 512 * 1024
MAX_PATHS = 5          # files per worker assignment, and per client request
MAX_ROOTS = 64         # roots a client names in its roots frame, for the log
PID_MAX = 4194304      # the widest pid (Linux's limit): the longest hello has it
HELLO_VERSION = 1
CLIENT_DIR_PREFIX = "osp-client-"   # a client's FIFOs: ENTRANCE_DIR/osp-client-XXXX/


def default_fifo():
    """$INTEGRITY_FIFO, else a private runtime directory of this user."""
    if os.environ.get("INTEGRITY_FIFO"):
        return os.environ["INTEGRITY_FIFO"]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = os.path.join(runtime, "osproject") if runtime else f"/tmp/osproject-{os.geteuid()}"
    return os.path.join(base, "server.fifo")


class ProtocolError(ValueError):
    """A peer sent something that is not a frame of ours."""


def encode(obj):
    """Return obj as one frame: compact ASCII JSON and a newline."""
    text = json.dumps(obj, ensure_ascii=True, separators=(",", ":"))
    return text.encode("ascii") + b"\n"


def decode(line):
    """Parse one frame (without its newline) into a dict, or raise ProtocolError."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(f"not a JSON frame: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("frame is not a JSON object")
    return obj


class LineBuffer:
    """Split a byte stream into lines, holding at most `limit` bytes of a line.

    feed() returns the complete lines; a line longer than the limit is
    dropped as it streams in and reported once as None, so a peer that never
    sends a newline costs bounded memory.
    """

    def __init__(self, limit=MAX_FRAME):
        self.limit = limit
        self._buf = bytearray()
        self._skipping = False

    def feed(self, data):
        """Add data; return the lines it completed (None for an oversized one)."""
        self._buf += data
        lines = []
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                break
            if self._skipping:
                self._skipping = False
            else:
                lines.append(bytes(self._buf[:end]) if end <= self.limit else None)
            del self._buf[:end + 1]
        if len(self._buf) > self.limit:
            if not self._skipping:
                lines.append(None)
            self._skipping = True
            self._buf.clear()
        return lines

    @property
    def pending(self):
        """True when a partial line is buffered (a torn frame at EOF)."""
        return bool(self._buf) or self._skipping


def encode_hello(request_fifo, reply_fifo, pid=None):
    """Return the hello frame a client writes to the entrance FIFO.

    It begins with a newline of its own, in the same atomic write: whatever
    partial line another writer left in the FIFO ends there, and the hello
    after it is read whole (the server skips empty lines).  `pid`, the
    client's, is for the server's log.  Raises ProtocolError when it would
    exceed HELLO_MAX: a longer write could interleave with another client's
    hello.
    """
    hello = {"hello": HELLO_VERSION, "request": request_fifo, "reply": reply_fifo}
    if pid is not None:
        hello["pid"] = pid
    frame = b"\n" + encode(hello)
    if len(frame) > HELLO_MAX:
        raise ProtocolError(f"hello is {len(frame)} bytes, more than {HELLO_MAX}: the "
                            "entrance FIFO's directory has too long a path")
    return frame


def longest_hello(entrance_dir):
    """Return the longest hello a client of an entrance in `entrance_dir` sends.

    Its FIFOs are in entrance_dir/osp-client-XXXXXXXX/ (tempfile.mkdtemp
    adds 8 characters).  Raises ProtocolError when it exceeds HELLO_MAX: then
    no client can ever say hello there.
    """
    private = os.path.join(entrance_dir, CLIENT_DIR_PREFIX + "x" * 8)
    return encode_hello(os.path.join(private, "request"), os.path.join(private, "reply"),
                        pid=PID_MAX)


def parse_hello(line):
    """Return (request_fifo, reply_fifo) from a hello line, or raise ProtocolError."""
    return read_hello(line)[:2]


def read_hello(line):
    """Return (request_fifo, reply_fifo, the client's pid or None) from a hello
    line, or raise ProtocolError."""
    frame = decode(line)
    if frame.get("hello") != HELLO_VERSION:
        raise ProtocolError("not a hello of protocol version 1")
    paths = frame.get("request"), frame.get("reply")
    if not all(is_absolute_path(p) for p in paths):
        raise ProtocolError("hello must name two absolute FIFO paths")
    pid = frame.get("pid")
    if pid is not None and not (type(pid) is int and 0 < pid <= PID_MAX):
        raise ProtocolError("a hello's pid must be a process id")
    return (*paths, pid)


def is_absolute_path(value):
    """An absolute path that the OS can take: a str, no NUL, encodable."""
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        return False
    try:
        os.fsencode(value)           # a lone surrogate from JSON is not a path
    except UnicodeEncodeError:
        return False
    return True
