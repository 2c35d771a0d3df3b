"""The wire protocol: framing, and the shape of every frame, in one place.

On the FIFOs, one JSON object per line.  JSON with ensure_ascii
escapes every control character and every byte that is not ASCII, so a
frame never contains a raw newline whatever the file names hold.  Names
that are not UTF-8 travel as os.fsdecode() strings (surrogateescape); JSON
carries the lone surrogates as \\udcXX and os.fsencode() restores the
original bytes on the other side.  A worker's pipes, which carry every
file twice, have compact frames of NUL-ended fields behind a length
(pack, FrameBuffer), paths as their bytes.

Each frame is built by one function here, and each frame a peer we do not
trust sends (a client's requests, a worker's answers) is checked by one
function here, so a field is added or renamed in one module (and in
docs/protocol.md, which lists every frame and field).  Three channels:

- the entrance FIFO: a client's hello (encode_hello, read_hello);
- a client's two FIFOs: requests up (request, check_item, roots,
  STATUS_REQUEST, audit; validate_request), replies down (welcome,
  verdict, replies, correction, bye, error);
- a worker's two pipes: assignments down (assignment of Tasks;
  read_assignment), results up (ready, progress, results; is_ready,
  is_progress, check_results).

The server may end a session with `{"error": REASON}`, in place of the
welcome or of the bye: the client reports REASON and exits 2.
"""

import json
import os
import re
import select
import struct
from collections.abc import Iterable
from typing import Any, NamedTuple, TypeGuard

from .store import FS_CODEC, SUFFIX

Frame = dict[str, Any]          # one decoded frame: a JSON object
Identity = tuple[int, int] | list[int]   # a directory's (st_dev, st_ino); JSON makes it a list

# POSIX guarantees atomic writes up to PIPE_BUF: 4096 on Linux, 512 on macOS.
PIPE_BUF = getattr(select, "PIPE_BUF", 512)
# A hello must never interleave with another client's, on any system: keep it
# within _POSIX_PIPE_BUF, the least PIPE_BUF POSIX allows.
HELLO_MAX = min(PIPE_BUF, 512)
# A frame of 5 files, each a path and a sidecar path of up to PATH_MAX
# bytes, always fits, though JSON spells a byte that is not UTF-8 in 6
# characters; a client's request of more files is cut to fit (see
# MAX_REQUEST).
MAX_FRAME = 512 * 1024
# The longest directory a request may name, and the longest name in it, in
# bytes: Linux's PATH_MAX (macOS's is 1024), and four times the NAME_MAX of
# every file system we know (255).  A request names a directory once for
# all its files, so these bound what one frame becomes in the server: 50
# paths and 50 sidecars of at most PATH_MAX + 1 + NAME_MAX bytes, every
# assignment well within MAX_FRAME.
PATH_MAX = 4096
NAME_MAX = 1024
# Where sidecars are may be deeper: a --store mirror of a directory is the
# store's path and the directory's, and a worker opens it one name at a time.
SIDECARS_MAX = 2 * PATH_MAX
MAX_PATHS = 5          # files per worker assignment
# Files per client request: the server cuts a request into assignments of
# MAX_PATHS.  A request whose frame would exceed MAX_FRAME goes as requests
# of MAX_PATHS files instead.
MAX_REQUEST = 50
MAX_ROOTS = 64         # roots a client names in its roots frame, for the log
PID_MAX = 4194304      # the widest pid (Linux's limit): the longest hello has it
HELLO_VERSION = 2      # 2: worker frames, ok frames, requests of files by directory
MAX_AUDIT = 100        # events per audit frame
MD5 = re.compile(r"[0-9a-f]{32}")   # a digest as md5sum prints it, and only that
CLIENT_DIR_PREFIX = "osp-client-"   # a client's FIFOs: ENTRANCE_DIR/osp-client-XXXX/


def default_fifo() -> str:
    """$INTEGRITY_FIFO, else a private runtime directory of this user."""
    if os.environ.get("INTEGRITY_FIFO"):
        return os.environ["INTEGRITY_FIFO"]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = os.path.join(runtime, "osproject") if runtime else f"/tmp/osproject-{os.geteuid()}"
    return os.path.join(base, "server.fifo")


class ProtocolError(ValueError):
    """A peer sent something that is not a frame of ours."""


def encode(obj: dict) -> bytes:
    """Return obj as one frame: compact ASCII JSON and a newline."""
    text = json.dumps(obj, ensure_ascii=True, separators=(",", ":"))
    return text.encode("ascii") + b"\n"


def decode(line: bytes) -> Frame:
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

    def __init__(self, limit: int = MAX_FRAME) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> list[bytes | None]:
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
    def pending(self) -> bool:
        """True when a partial line is buffered (a torn frame at EOF)."""
        return bool(self._buf) or self._skipping


def encode_hello(request_fifo: str, reply_fifo: str, pid: int | None = None) -> bytes:
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


def longest_hello(entrance_dir: str) -> bytes:
    """Return the longest hello a client of an entrance in `entrance_dir` sends.

    Its FIFOs are in entrance_dir/osp-client-XXXXXXXX/ (tempfile.mkdtemp
    adds 8 characters).  Raises ProtocolError when it exceeds HELLO_MAX: then
    no client can ever say hello there.
    """
    private = os.path.join(entrance_dir, CLIENT_DIR_PREFIX + "x" * 8)
    return encode_hello(os.path.join(private, "request"), os.path.join(private, "reply"),
                        pid=PID_MAX)


def parse_hello(line: bytes) -> tuple[str, str]:
    """Return (request_fifo, reply_fifo) from a hello line, or raise ProtocolError."""
    return read_hello(line)[:2]


def read_hello(line: bytes) -> tuple[str, str, int | None]:
    """Return (request_fifo, reply_fifo, the client's pid or None) from a hello
    line, or raise ProtocolError."""
    frame = decode(line)
    version = frame.get("hello")
    if type(version) is not int or version < 1:
        raise ProtocolError("not a hello")
    request, reply = frame.get("request"), frame.get("reply")
    if not (is_absolute_path(request) and is_absolute_path(reply)):
        raise ProtocolError("hello must name two absolute FIFO paths")
    pid = frame.get("pid")
    if pid is not None and not (type(pid) is int and 0 < pid <= PID_MAX):
        raise ProtocolError("a hello's pid must be a process id")
    if version != HELLO_VERSION:
        raise VersionMismatch(version, request, reply)
    return request, reply, pid


class VersionMismatch(ProtocolError):
    """A well-formed hello of another protocol version: its client can be told why."""

    def __init__(self, version: int, request: str, reply: str) -> None:
        super().__init__(f"this client speaks protocol version {version}, the server "
                         f"{HELLO_VERSION}: a client and its server must be of one release "
                         "(restart the server after an upgrade)")
        self.request, self.reply = request, reply


def is_absolute_path(value: object) -> TypeGuard[str]:
    """An absolute path that the OS can take: a str, no NUL, encodable."""
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        return False
    if value.isascii():
        return True
    try:
        value.encode(*FS_CODEC)      # a lone surrogate from JSON is not a path
    except UnicodeEncodeError:
        return False
    return True


# -- a client's requests (client -> server, on its request FIFO) ---------------------

STATUS_REQUEST = {"status": True}       # integrity-client --status: the whole request
AUDIT_EVENTS = ("file.changed", "file.missing", "file.moved")
_FIELD = re.compile(r"[a-z][a-z0-9_]{0,31}")


def roots(paths: list[str], count: int) -> Frame:
    """What the client checks, for the server's log: the first MAX_ROOTS roots."""
    return {"roots": list(paths[:MAX_ROOTS]), "count": count}


class CheckItem(NamedTuple):
    """One file of a client's request: its absolute path, its sidecar's (None:
    the sidecar's name is a file of its own), its directory's (st_dev, st_ino),
    the baseline hash the client holds, its size (for batching) and whether to
    rewrite a changed baseline."""
    path: str
    sidecar: str | None
    dir: tuple[int, int] | None
    expected: str | None = None
    size: int = 0
    update: bool = False


def check_item(path: str, sidecar: str | None, directory: Identity | None,
               expected: str | None = None, size: int = 0, update: bool = False) -> CheckItem:
    """A CheckItem, its directory's identity a tuple."""
    return CheckItem(path, sidecar,
                     None if directory is None else (directory[0], directory[1]),
                     expected, size, update)


def request(rid: int, items: Iterable[CheckItem]) -> Frame:
    """A request: up to MAX_REQUEST files, answered one verdict each under `rid`.

    Files go by directory, each named once: [directory, st_dev, st_ino,
    where their sidecars are (None: beside them), [[name, expected, size],
    ...]], a file's list ending in False when it can have no sidecar.  A
    directory ends in "/" only where its path does not end there without it
    ("//", for "//x": validate_request joins a name to it with one "/"
    unless it ends in one), so every path reads back as it was.  A sidecar
    is always the file's name and SUFFIX (beside it, or in a --store
    mirror); `update` is the client's, one for all its files (ValueError
    for items that differ in it).
    """
    groups: list[list] = []
    items = list(items)
    update = bool(items) and items[0].update
    for item in items:
        if item.update != update:
            raise ValueError("one request, one update: the client's for all its files")
        directory, name = _split(item.path)
        file: list = [name, item.expected, item.size]
        where = None
        if item.sidecar is None:
            file.append(False)
        else:
            where, sidecar_name = _split(item.sidecar)
            if sidecar_name != name + SUFFIX:
                raise ValueError(f"a sidecar is its file's name and {SUFFIX}: {item.sidecar}")
            if where == directory:
                where = None
        identity = [None, None] if item.dir is None else list(item.dir)
        last = groups[-1] if groups else None
        if last is None or last[0] != directory or last[1:3] != identity \
                or (item.sidecar is not None and last[3] != where):
            last = [directory, *identity, where, []]
            groups.append(last)
        last[4].append(file)
    frame: Frame = {"id": rid, "dirs": groups}
    if update:
        frame["update"] = True
    return frame


def _split(path: str) -> tuple[str, str]:
    """(directory, name) of a path, the directory as a request sends it."""
    head, _, name = path.rpartition("/")
    return (head if head and not head.endswith("/") else head + "/"), name


def nameable(path: str, sidecar: str | None) -> bool:
    """Can a request name this file, as validate_request will check it: its
    directory at most PATH_MAX bytes, its name at most NAME_MAX, its
    sidecar's directory at most SIDECARS_MAX?  (A lister cannot enter a
    directory deeper than PATH_MAX; a --store mirror can be deeper.)"""
    if len(path) <= NAME_MAX and path.isascii() and (
            sidecar is None or len(sidecar) <= PATH_MAX and sidecar.isascii()):
        return True
    directory, name = _split(path)
    return fits(directory, PATH_MAX) and fits(name, NAME_MAX) and (
        sidecar is None or fits(_split(sidecar)[0], SIDECARS_MAX))


def fits(text: str, limit: int) -> bool:
    """Is `text` at most `limit` bytes as the OS takes it?  One it cannot
    encode is no path at all: False.  (A character can be 8 bytes: euc_kr.)"""
    if len(text) > limit:
        return False
    if text.isascii():
        return True
    try:
        return len(text.encode(*FS_CODEC)) <= limit
    except UnicodeEncodeError:
        return False


def audit(events: list[dict]) -> Frame:
    """Up to MAX_AUDIT alterations a client found, each {"event": ..., fields}."""
    return {"audit": [{k: v for k, v in event.items() if v is not None}
                      for event in events]}


class Request(NamedTuple):
    """A client's request of files, as validate_request read it."""
    rid: int
    items: list[CheckItem]


def validate_request(frame: Frame) -> "Frame | Request":
    """Check a frame from a client; return it (a request of files as a
    Request), or raise ProtocolError saying why.

    Each kind of frame has its keys and no others, so the server can tell
    them apart by one key: a status request is {"status": true} alone.
    """
    if frame.get("status") is True and len(frame) == 1:
        return frame
    if "audit" in frame and len(frame) == 1:
        return validate_audit(frame)
    if "roots" in frame:
        if set(frame) != {"roots", "count"}:
            raise ProtocolError("a roots frame has roots and count, nothing else")
        paths, count = frame["roots"], frame.get("count")
        if not (isinstance(paths, list) and len(paths) <= MAX_ROOTS
                and all(is_absolute_path(r) for r in paths)
                and type(count) is int and count >= len(paths)):
            raise ProtocolError("roots: a list of absolute paths, and their count")
        return frame
    groups = frame.get("dirs")
    if not frame.keys() <= {"id", "dirs", "update"} or "id" not in frame \
            or type(frame["id"]) is not int or not isinstance(groups, list) or not groups:
        raise ProtocolError("a request has an id and its files by directory (dirs), and "
                            "update or nothing else")
    update = frame.get("update", False)
    if update is not True and update is not False:
        raise ProtocolError("update must be true or false")
    items: list[CheckItem] = []
    for group in groups:
        items += _check_group(group, update)
        if len(items) > MAX_REQUEST:
            break
    if len(items) > MAX_REQUEST:
        raise ProtocolError(f"a request has 1 to {MAX_REQUEST} files")
    return Request(frame["id"], items)


def _check_group(group: object, update: bool) -> list[CheckItem]:
    """The files of one directory of a request, read into CheckItems."""
    if type(group) is not list or len(group) != 5:
        raise ProtocolError("a directory of a request is [directory, st_dev, st_ino, "
                            "sidecars, files]")
    directory, dev, ino, where, files = group
    if not (is_absolute_path(directory) and fits(directory, PATH_MAX)):
        raise ProtocolError(f"a directory of a request must be an absolute path of at most "
                            f"{PATH_MAX} bytes")
    if dev is None and ino is None:     # without an identity the worker reads nothing
        identity = None
    elif type(dev) is int and type(ino) is int:
        identity = (dev, ino)
    else:
        raise ProtocolError("a directory's st_dev and st_ino are two integers (or nulls)")
    if not (where is None or is_absolute_path(where) and fits(where, SIDECARS_MAX)):
        raise ProtocolError(f"sidecars are in an absolute directory of at most "
                            f"{SIDECARS_MAX} bytes (or null: beside)")
    if type(files) is not list or not files or len(files) > MAX_REQUEST:
        raise ProtocolError(f"a directory of a request has 1 to {MAX_REQUEST} files")
    prefix = directory if directory.endswith("/") else directory + "/"
    sidecars = prefix if where is None else where if where.endswith("/") else where + "/"
    return [_check_file(file, prefix, sidecars, identity, update) for file in files]


def _check_file(file: object, prefix: str, sidecars: str, identity: tuple[int, int] | None,
                update: bool) -> CheckItem:
    if type(file) is not list or not 3 <= len(file) <= 4:
        raise ProtocolError("a file of a request is [name, expected, size] (and false: "
                            "no sidecar)")
    name, expected, size = file[0], file[1], file[2]
    if type(name) is not str or not name or "/" in name or name in (".", "..") \
            or not is_absolute_path(prefix + name):
        raise ProtocolError("a file's name is one entry of its directory")
    if not fits(name, NAME_MAX):
        raise ProtocolError(f"a file's name is at most {NAME_MAX} bytes")
    if expected is not None and not (type(expected) is str and MD5.fullmatch(expected)):
        raise ProtocolError("expected must be 32 lowercase hex digits")
    if type(size) is not int:
        raise ProtocolError("size must be an integer")
    if len(file) == 3:
        return CheckItem(prefix + name, sidecars + name + SUFFIX, identity, expected, size,
                         update)
    if file[3] is not False:
        raise ProtocolError("a file's fourth field is false (no sidecar) or absent")
    return CheckItem(prefix + name, None, identity, expected, size, update)


def validate_audit(frame: Frame) -> Frame:
    """An audit frame: the alterations a client found, for the server's log."""
    events = frame["audit"]
    if not isinstance(events, list) or not 0 < len(events) <= MAX_AUDIT:
        raise ProtocolError(f"an audit frame has 1 to {MAX_AUDIT} events")
    for event in events:
        if not isinstance(event, dict) or event.get("event") not in AUDIT_EVENTS:
            raise ProtocolError(f"an audit event is one of {', '.join(AUDIT_EVENTS)}")
        for key, value in event.items():
            if not _FIELD.fullmatch(key) or key == "session" \
                    or not isinstance(value, (str, int)) or isinstance(value, bool):
                raise ProtocolError("audit fields are lowercase names with a string "
                                    "or number")
    return frame


# -- the server's replies (server -> client, on its reply FIFO) ----------------------

def welcome(session: int, server_pid: int) -> Frame:
    """The first frame of a session: the protocol version, who serves, our number."""
    return {"welcome": HELLO_VERSION, "server": server_pid, "session": session}


def read_welcome(frame: Frame) -> int | None:
    """Return the session number a welcome gives, or raise ProtocolError."""
    version = frame.get("welcome")
    if type(version) is int and version != HELLO_VERSION:
        raise ProtocolError(f"the server speaks protocol version {version}, this client "
                            f"{HELLO_VERSION}: a client and its server must be of one "
                            "release (restart the server after an upgrade)")
    if version != HELLO_VERSION:
        raise ProtocolError("the server answered with something else than welcome")
    return frame.get("session")


def verdict(rid: int, index: int, status: str, md5: str | None = None,
            expected: str | None = None, error: str | None = None,
            unchecked: bool = False) -> Frame:
    """One file's verdict: file `index` ("i") of request `rid` ("id").

    `md5` is the agreed hash, `expected` the baseline the client sent, and
    `unchecked` says one worker's word stands for it (the server may still
    correct it before the bye).  Fields that are None are left out.
    """
    frame = {"id": rid, "i": index, "status": status}
    if md5 is not None:
        frame["md5"] = md5
    if expected is not None:
        frame["expected"] = expected
    if error is not None:
        frame["error"] = error
    if unchecked:
        frame["unchecked"] = True
    return frame


def replies(verdicts: list[Frame]) -> Frame:
    """A loop pass's verdicts for one client, REPLIES_PER_FRAME at most."""
    return {"replies": verdicts}


def oks(found: list[list[int]]) -> Frame:
    """A loop pass's files found OK at once, as [rid, index, index...] per request.

    The verdict of a file whose one reading equals the baseline it was sent
    with (Trust.answer_ok) says nothing but OK: its hash is that baseline.
    Most of a clean verify, at a few bytes a file instead of a verdict each.
    """
    return {"ok": found}


def read_oks(frame: Frame) -> list[list[int]]:
    """The [rid, index...] lists of an ok frame, or raise ProtocolError."""
    found = frame["ok"]
    if not isinstance(found, list) or not all(
            isinstance(batch, list) and len(batch) >= 2
            and all(type(n) is int for n in batch) for batch in found):
        raise ProtocolError("an ok frame lists [request id, index...] lists")
    return found


def correction(path: str, status: str, md5: str | None, error: str | None) -> Frame:
    """An unchecked verdict overturned: its worker was caught lying since."""
    return {"correct": {"path": path, "status": status, "md5": md5, "error": error}}


def bye(counts: dict[str, int]) -> Frame:
    """The last frame of a session served to the end: the verdicts by status."""
    return {"bye": counts}


def error(reason: str) -> Frame:
    """The last frame of a session the server ends early, in place of the bye."""
    return {"error": reason}


def status_report(report: dict) -> Frame:
    return {"status": report}


# -- a worker's assignments and results (on its pipes) -------------------------------
#
# Not JSON: these legs carry every file twice (down and up), so their frames
# are a 4-byte big-endian length and that many bytes of fields, each ended
# by a NUL (a path never holds one).  Paths travel as their bytes.  The
# first field names the frame; a result's fields sit at fixed places (see
# RESULT_FIELDS), so the server parses an untrusted worker's answer by
# position, with no decoder of any general format in between.

WRITE_MODES = ("new", "replace", "keep", "discard")
_LENGTH = struct.Struct(">I")
# md5, size, mtime, ctime, ino, flags (r: racy, w: wrote, d: discarded),
# error, skipped, unstable; an empty field is an absent one.
RESULT_FIELDS = 9
ITEM_FIELDS = 6         # path, sidecar, st_dev, st_ino, write, stale pids
_HEX = b"0123456789abcdef"


class Task(NamedTuple):
    """One file of an assignment, as the worker reads it.  Never its expected
    hash: a worker that knew it could agree without reading."""
    path: str
    sidecar: str | None
    dir: tuple[int, int] | None
    write: str
    stale: tuple[int, ...] = ()     # pids of dead workers that may have left temp files


def pack(fields: Iterable[bytes]) -> bytes:
    """Return one worker-leg frame: its length, then each field and a NUL."""
    payload = b"\0".join(fields) + b"\0"
    return _LENGTH.pack(len(payload)) + payload


class FrameBuffer:
    """Split a worker-leg byte stream into frames of at most `limit` bytes.

    feed() returns the fields of each complete frame; a frame announced
    longer than the limit is reported as None, and the stream is then
    past saving (its peer is faulty), so the buffer keeps nothing more.
    """

    def __init__(self, limit: int = MAX_FRAME) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._broken = False

    def feed(self, data: bytes) -> list[list[bytes] | None]:
        if self._broken:
            return []
        buf = self._buf
        buf += data
        frames: list[list[bytes] | None] = []
        start = 0
        while len(buf) - start >= 4:
            (size,) = _LENGTH.unpack_from(buf, start)
            if not 0 < size <= self.limit:      # a frame has its name at least
                self._broken = True
                buf.clear()
                frames.append(None)
                return frames
            end = start + 4 + size
            if end > len(buf):
                break
            if buf[end - 1] != 0:           # a field not ended: not a frame of ours
                self._broken = True
                buf.clear()
                frames.append(None)
                return frames
            else:
                frames.append(bytes(buf[start + 4:end - 1]).split(b"\0"))
            start = end
        del buf[:start]
        return frames

    @property
    def pending(self) -> bool:
        return bool(self._buf)


def assignment(aid: int, tasks: Iterable[Task]) -> bytes:
    """The frame of assignment `aid`: up to MAX_PATHS tasks."""
    fields = [b"assign", b"%d" % aid]
    for task in tasks:
        identity = (b"", b"") if task.dir is None else (b"%d" % task.dir[0],
                                                        b"%d" % task.dir[1])
        fields += (task.path.encode(*FS_CODEC),
                   b"" if task.sidecar is None else task.sidecar.encode(*FS_CODEC),
                   *identity, task.write.encode("ascii"),
                   b",".join(b"%d" % pid for pid in task.stale))
    return pack(fields)


def read_assignment(fields: list[bytes]) -> tuple[int, list[Task]]:
    """(id, tasks) of an assignment frame from the server, which the worker trusts;
    raise ProtocolError for anything else."""
    body = len(fields) - 2
    if fields[0] != b"assign" or body <= 0 or body % ITEM_FIELDS:
        raise ProtocolError("not an assignment")
    tasks = []
    for i in range(2, len(fields), ITEM_FIELDS):
        path, sidecar, dev, ino, write, stale = fields[i:i + ITEM_FIELDS]
        tasks.append(Task(os.fsdecode(path), os.fsdecode(sidecar) if sidecar else None,
                          (int(dev), int(ino)) if dev else None, write.decode("ascii"),
                          tuple(int(pid) for pid in stale.split(b",")) if stale else ()))
    return int(fields[1]), tasks


def ready(pid: int) -> bytes:
    """A new worker is up: the first frame it sends."""
    return pack((b"ready", b"%d" % pid))


def progress(aid: int) -> bytes:
    """Still alive, on a big file: resets the server's hang clock."""
    return pack((b"progress", b"%d" % aid))


def _reason(text: object) -> bytes:
    if not text:
        return b""
    raw = str(text).encode("utf-8", "backslashreplace").replace(b"\0", b" ")
    return raw[:MAX_REASON]


def results(aid: int, answers: Iterable[dict]) -> bytes:
    """The answer to assignment `aid`: one result per task, in its order.

    A result is a dict as hash_file() makes it: md5 with size, mtime, ctime
    and ino; racy, wrote, discarded; error, skipped, unstable."""
    fields = [b"results", b"%d" % aid]
    for r in answers:
        md5 = r.get("md5")
        if md5:
            fields += (md5.encode("ascii"), b"%d" % r["size"], b"%d" % r["mtime"],
                       b"%d" % r["ctime"], b"%d" % r["ino"])
            if r.keys() == _PLAIN_READING:
                fields += (b"r" if r["racy"] else b"", b"", b"", b"")
                continue
        else:
            fields += (b"", b"", b"", b"", b"")
        fields += ((b"r" if r.get("racy") else b"") + (b"w" if r.get("wrote") else b"")
                   + (b"d" if r.get("discarded") else b""),
                   _reason(r.get("error")), _reason(r.get("skipped")),
                   _reason(r.get("unstable")))
    return pack(fields)


MAX_REASON = 1000       # bytes of a worker's error, skipped or unstable reason
_PLAIN_READING = {"md5", "size", "mtime", "ctime", "ino", "racy"}   # nothing else to say


def _printable(text: str) -> str:
    """A worker's words, with what a terminal would act on (ESC, CR, a newline
    that would start a forged report line) spelled out as escapes, and a
    backslash doubled, so that an escape means one thing only."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join("\\\\" if c == "\\" else c if c.isprintable() else
                   f"\\x{ord(c):02x}" if ord(c) < 0x100 else
                   f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"
                   for c in text)


def is_ready(fields: list[bytes], pid: int) -> bool:
    return fields == [b"ready", b"%d" % pid]


def is_progress(fields: list[bytes], aid: int) -> bool:
    return fields == [b"progress", b"%d" % aid]


def check_results(fields: list[bytes], aid: int, count: int) -> list[dict]:
    """Return the results of a worker's answer to assignment `aid` of `count`
    files, each a dict with "md5" and "stat": (size, mtime, ctime, ino) when
    it has a hash, "racy", "wrote", "discarded" when set, and "error",
    "skipped", "unstable" when given; raise ProtocolError if it is not such
    an answer.

    A worker is not trusted: what it says goes to a client and to the log
    only as a string of bounded length or a boolean, and a result is the
    file of its place: there is no path in it to be the wrong one."""
    if fields[0] != b"results" or len(fields) != 2 + RESULT_FIELDS * count \
            or fields[1] != b"%d" % aid:
        raise ProtocolError("answer does not match its assignment")
    answers = []
    for i in range(2, len(fields), RESULT_FIELDS):
        md5, size, mtime, ctime, ino, flags, error, skipped, unstable = \
            fields[i:i + RESULT_FIELDS]
        result: dict[str, Any] = {}
        if md5:
            if len(md5) != 32 or md5.translate(None, _HEX):
                raise ProtocolError("malformed md5")
            try:            # int() takes " 1" and "1_0" too: still the integers they spell
                result["stat"] = (int(size), int(mtime), int(ctime), int(ino))
            except ValueError:
                raise ProtocolError("malformed stat") from None
            result["md5"] = md5.decode("ascii")
        elif size or mtime or ctime or ino:
            raise ProtocolError("malformed stat")
        if flags:
            if flags.translate(None, b"rwd"):
                raise ProtocolError("malformed flags")
            result["racy"] = b"r" in flags
            result["wrote"] = b"w" in flags
            result["discarded"] = b"d" in flags
        for key, value in (("error", error), ("skipped", skipped), ("unstable", unstable)):
            if value:
                if len(value) > MAX_REASON:
                    raise ProtocolError(f"malformed {key}")
                result[key] = _printable(value.decode("utf-8", "replace"))
        answers.append(result)
    return answers
