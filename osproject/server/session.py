"""Client sessions on the server side: each one's FIFOs and buffers, and the
registry that owns them all and takes each through its life.

A session is SERVING while its client may send requests, DRAINING once the
client closed its request FIFO and verdicts are still owed, LEAVING once
the bye is queued and until it is written; then it is CLOSED.  A client
that vanishes, is refused or falls behind is DROPPED, from any state.
`Session.enter` is the one place a state changes, checked against the
table, as a worker slot's is (supervisor.py).
"""

import enum
import errno
import itertools
import os
import stat
import tempfile
from collections import deque

from .. import protocol
from ..statuses import OK
from ..store import FS_CODEC
from .verifier import Vote

MAX_OUTPUT = 4 * 1024 * 1024   # a client that stops reading is dropped past this
REPLIES_PER_FRAME = 50         # verdicts are ~150 bytes: a frame stays far below MAX_FRAME
OK_PER_FRAME = 5000            # files found OK at once per ok frame: a few bytes each
READ_SIZE = 64 * 1024
MAX_SESSIONS = 100        # two fds each: select() cannot watch fds >= FD_SETSIZE
SPARE_SESSIONS = 4        # beyond MAX_SESSIONS, for --status only: it always gets in
SPARE_IDLE = 5.0          # seconds a spare session may take to ask for the status
VANISHED = "client vanished: its reply FIFO is closed"


class State(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"
    LEAVING = "leaving"
    CLOSED = "closed"
    DROPPED = "dropped"


TRANSITIONS = {
    State.SERVING: {State.DRAINING, State.LEAVING, State.DROPPED},
    State.DRAINING: {State.LEAVING, State.DROPPED},
    State.LEAVING: {State.CLOSED, State.DROPPED},
    State.CLOSED: set(),
    State.DROPPED: set(),
}


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
        self.state = State.SERVING
        self.dead = False         # a write failed, or it is closed: replies go nowhere
        self.outstanding = 0      # jobs whose verdict is not sent yet
        self.due = {}             # rid -> files of that request not answered yet
        self.replies = []         # verdicts not sent yet, sent together by pack()
        self.oks = {}             # rid -> indexes found OK at once not sent yet, ditto
        self.completed = False    # a request was answered in full since the last pack()
        self.files = 0
        self.counts = {}
        self.unchecked = Unchecked()
        self.heard_at = 0.0       # when the client last sent something (server's clock)
        self.pid = None           # the client's, as its hello says
        self.spare = False        # admitted past MAX_SESSIONS: for --status only

    def enter(self, new):
        """Move to state `new`; the transition table is the law."""
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"session {self.sid}: {self.state.name} -> {new.name}")
        self.state = new

    @property
    def eof(self):
        """The client closed its request FIFO: it asks for nothing more."""
        return self.state is not State.SERVING

    @property
    def said_bye(self):
        """Its bye is out (or on its way): no more re-checks for it."""
        return self.state in (State.LEAVING, State.CLOSED)

    @property
    def wants_requests(self):
        """Is the client's request FIFO worth watching?"""
        return self.state is State.SERVING and not self.dead

    def read(self):
        """Return the request frames now readable; DRAINING once the client is done.

        Raises ProtocolError for a frame that is not a valid request, Refused
        for one torn or too long.
        """
        if self.dead:
            return []
        try:
            data = os.read(self.request_fd, READ_SIZE)
        except BlockingIOError:
            return []
        if not data:
            self.enter(State.DRAINING)
            if self.lines.pending:
                raise Refused("request torn at end of file")
            return []
        frames = []
        for line in self.lines.feed(data):
            if line is None:
                raise Refused("request frame too long")
            frames.append(protocol.validate_request(protocol.decode(line)))
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

    def pack(self):
        """Frame the queued verdicts once a request is answered in full (raises
        Refused like send).

        The client acts on a request only when its last verdict is in (it
        frees the asking checker's place), so verdicts wait for that: one
        frame a request or so, not one a loop pass, and so a tenth of the
        writes here and of the reads and wake-ups in the client.  Every
        request is answered in full in the end, so nothing waits for ever.
        """
        if not self.completed:
            return
        self.completed = False
        if self.oks:
            found, count = [], 0
            for rid, indexes in self.oks.items():
                found.append([rid, *indexes])
                count += len(indexes)
                if count >= OK_PER_FRAME:
                    self.send(protocol.oks(found))
                    found, count = [], 0
            if found:
                self.send(protocol.oks(found))
            self.oks = {}
        while self.replies:
            batch = self.replies[:REPLIES_PER_FRAME]
            del self.replies[:REPLIES_PER_FRAME]
            self.send(protocol.replies(batch))

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
        self.outbuf += protocol.encode(protocol.error(reason))
        self.flush()

    def expect(self, jobs=1):
        """More jobs whose end the session waits for: a re-check, say."""
        self.outstanding += jobs

    def requested(self, rid, files):
        """A request of `files` files under `rid`: each is answered().

        Raises Refused for an id still being answered: its verdicts would
        wait for both requests, and a client that kept one id in flight
        would have them all held here for ever (pack)."""
        if rid in self.due:
            raise Refused(f"request {rid} is still being answered: an id is used once")
        self.outstanding += files
        self.due[rid] = files

    def answered(self, verdict, status):
        """Queue one file's verdict; they leave together (see pack)."""
        self.outstanding -= 1
        self._one_less(verdict["id"])
        self.counts[status] = self.counts.get(status, 0) + 1
        if not self.dead:
            self.replies.append(verdict)

    def answered_ok(self, rid, index):
        """answered(), for a file found OK at once: it goes in an ok frame."""
        self.outstanding -= 1
        self._one_less(rid)
        self.counts[OK] = self.counts.get(OK, 0) + 1
        if not self.dead:
            indexes = self.oks.get(rid)
            if indexes is None:
                self.oks[rid] = [index]
            else:
                indexes.append(index)

    def _one_less(self, rid):
        left = self.due.get(rid, 1) - 1     # none due (a bug of ours): it goes out at once
        if left > 0:
            self.due[rid] = left
        else:
            self.due.pop(rid, None)
            self.completed = True

    def settled_aside(self):
        """A job it waited for ended with nothing to tell (a re-check that
        confirmed, a proof)."""
        self.outstanding -= 1

    def close(self):
        """Close both FIFOs; a handler still queued for them in this pass sees dead."""
        self.dead = True
        for fd in (self.request_fd, self.reply_fd):
            if fd >= 0:
                os.close(fd)
        self.request_fd = self.reply_fd = -1
        self.unchecked.close()


class Unchecked:
    """Hashes a worker gave that nobody cross-checked, kept for re-verification.

    If that worker is caught lying during the session, they are checked
    again.  Packed into one bytearray per worker, NUL-terminated fields (a
    path never holds a NUL), about 150 bytes a file instead of a kilobyte of
    objects: on a first run this is the only server state that grows with
    the tree.  Past SPILL bytes, a worker's go to an unlinked temp file, so
    the server's memory stays flat however big the tree (a temp file that
    cannot be written leaves them in memory: nothing is lost).
    """

    FIELDS = 11
    SPILL = 1 << 20             # bytes of one worker's hashes held in memory at most

    def __init__(self):
        self._by_wid = {}           # wid -> its packed hashes not in the temp file
        self._spans = {}            # wid -> [(offset, length)] of its hashes in the file
        self._file = None           # the temp file, once a worker's hashes pass SPILL
        self._end = 0
        self._no_file = False       # a temp file failed once: memory only from then on
        self._slots = {}            # wid -> its slot, once per worker, for the log
        self._counts = {}           # wid -> how many of its hashes are kept

    def add(self, path, sidecar, directory, vote):
        self._slots[vote.wid] = vote.slot
        packed = self._by_wid.get(vote.wid)
        if packed is None:
            packed = self._by_wid[vote.wid] = bytearray()
        dev, dir_ino = directory or (-1, -1)
        size, mtime, ctime, ino = vote.stat
        packed += b"%s\0%s\0%s\0%d\0%d\0%d\0%d\0%d\0%d\0%d\0%d\0" % (
            path.encode(*FS_CODEC), sidecar.encode(*FS_CODEC) if sidecar else b"",
            vote.md5.encode("ascii"), dev, dir_ino, size, mtime, ctime, ino, vote.racy,
            vote.pid)
        self._counts[vote.wid] = self._counts.get(vote.wid, 0) + 1    # once it is packed
        if len(packed) >= self.SPILL and not self._no_file:
            self._spill(vote.wid, packed)

    def _spill(self, wid, packed):
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="osp-unchecked-", buffering=0)
            fd, offset, written = self._file.fileno(), self._end, 0
            with memoryview(packed) as view:
                while written < len(packed):
                    written += os.pwrite(fd, view[written:], offset + written)
        except OSError:             # kept in memory, then, and never tried again: a
            self._no_file = True    # full disk would cost a write of it per file
            return
        self._end = offset + written
        self._spans.setdefault(wid, []).append((offset, len(packed)))
        packed.clear()

    def take(self, wid):
        """Return a Backlog of worker `wid`'s hashes, forgotten here, or None if
        it gave none unchecked.  Nothing is read yet: the Backlog reads its
        hashes back one span at a time, as they are re-checked, so a liar
        caught late in a big first run costs the server a span (about
        SPILL bytes, a few thousand hashes), not all its hashes at once."""
        count = self._counts.pop(wid, 0)
        if not count:
            return None
        return Backlog(self, wid, self._spans.pop(wid, []),
                       bytes(self._by_wid.pop(wid, b"")), count, self._slots.pop(wid, None))

    def read_span(self, offset, length):
        """The bytes a spill wrote at offset (what a Backlog reads back)."""
        if self._file is None:          # closed with its session
            raise OSError(errno.EBADF, "the unchecked hashes' temp file is closed")
        parts = []
        while length:
            data = os.pread(self._file.fileno(), length, offset)
            if not data:
                raise OSError(errno.EIO, "the unchecked hashes' temp file is cut short")
            parts.append(data)
            offset, length = offset + len(data), length - len(data)
        return b"".join(parts)

    def close(self):
        """Forget every hash, and the temp file with them (a Backlog taken
        from it reads no more)."""
        self._by_wid, self._spans, self._slots, self._counts = {}, {}, {}, {}
        if self._file is not None:
            self._file.close()
            self._file = None



class Backlog:
    """One worker's unchecked hashes in one session, taken for re-checking:
    read back from Unchecked's temp file one span at a time."""

    def __init__(self, unchecked, wid, spans, tail, count, slot):
        self._unchecked, self.wid, self._slot = unchecked, wid, slot
        self._spans = deque(spans)  # (offset, length) in the temp file, in order
        self._tail = tail           # the last hashes, never spilled
        self._ready: deque[tuple] = deque()     # parsed, not handed out yet
        self.left = count           # hashes not handed out yet

    def take(self, n):
        """Return up to `n` of [(path, sidecar, directory, Vote)], in the order
        they were kept.  A read that fails raises OSError and loses nothing:
        the next take() tries that span again."""
        while len(self._ready) < n and (self._spans or self._tail):
            if self._spans:
                offset, length = self._spans[0]
                self._ready.extend(self._parse(self._unchecked.read_span(offset, length)))
                self._spans.popleft()
            else:
                self._ready.extend(self._parse(self._tail))
                self._tail = b""
        taken = [self._ready.popleft() for _ in range(min(n, len(self._ready)))]
        self.left -= len(taken)
        return taken

    def _parse(self, packed):
        fields = packed.split(b"\0")[:-1]
        wid, slot, width = self.wid, self._slot, Unchecked.FIELDS
        for i in range(0, len(fields), width):
            path, sidecar, md5, *numbers = fields[i:i + width]
            dev, dir_ino, size, mtime, ctime, ino, racy, pid = map(int, numbers)
            yield (os.fsdecode(path), os.fsdecode(sidecar) or None, (dev, dir_ino),
                   Vote(wid, md5.decode("ascii"), (size, mtime, ctime, ino), bool(racy),
                        pid, slot))


class Sessions:
    """Every session the server serves: the one owner of the list.

    It opens sessions from hellos, sends their replies, drops the ones that
    go wrong and closes the ones served to the end, taking each through its
    states.  The loop and the trust code go through it; nothing else keeps
    a session list.
    """

    def __init__(self, log, scheduler, clock, idle_timeout):
        self.log = log
        self.scheduler = scheduler      # a dropped session's waiting jobs go with it
        self.clock = clock
        self.idle_timeout = idle_timeout
        self._live = []
        self._sids = itertools.count(1)

    def __iter__(self):
        return iter(list(self._live))   # a copy: handlers drop sessions as they go

    def __len__(self):
        return len(self._live)

    def waiting(self):
        """The sessions that wait for verdicts."""
        return [s for s in self._live if s.outstanding > 0]

    def open(self, request_fifo, reply_fifo, pid):
        """Serve the client whose hello names these FIFOs; return its Session.

        Past MAX_SESSIONS a few spare sessions are for --status only, so that
        it gets in however many clients there are; past those, the client is
        told it is refused (Refused is raised).
        """
        session = Session(next(self._sids), request_fifo, reply_fifo)
        session.heard_at = self.clock()
        session.pid = pid
        regular = sum(not s.spare for s in self._live)
        if regular >= MAX_SESSIONS:
            if len(self._live) - regular >= SPARE_SESSIONS:
                session.say_goodbye("too many clients; try again later")
                session.close()
                raise Refused("too many clients")
            session.spare = True
        self._live.append(session)
        self.log.info("session.opened", session=session.sid, pid=session.pid,
                      uid=session.uid, reply=session.reply_path,
                      spare=session.spare or None)
        session.send(protocol.welcome(session.sid, os.getpid()))
        session.flush()
        return session

    def turn_away(self, request_fifo, reply_fifo, reason):
        """Tell a client we will not serve why, best effort, and close at once."""
        try:
            session = Session(next(self._sids), request_fifo, reply_fifo)
        except Refused:
            return
        session.say_goodbye(reason)
        session.close()

    def send(self, session, frame):
        """Queue a frame for a client; drop it if it lets too much pile up."""
        try:
            session.send(frame)
        except Refused as exc:
            self.drop(session, str(exc))

    def refuse(self, session, reason):
        """Drop a client, telling it why if its reply FIFO takes one more frame."""
        session.say_goodbye(reason)
        self.drop(session, reason)

    def drop(self, session, reason):
        """Stop serving a client; its queued files are forgotten."""
        if session not in self._live:
            session.dead = True
            return
        session.dead = True
        session.outbuf.clear()
        self.scheduler.forget(session)
        self._live.remove(session)
        session.enter(State.DROPPED)
        session.close()
        self.log.warning("session.dropped", session=session.sid, reason=reason,
                         files=session.files, unanswered=session.outstanding or None,
                         **_lower(session.counts))

    def send_replies(self):
        """Send each client this pass's verdicts, batched, and start writing them."""
        for session in self:
            try:
                session.pack()
            except Refused as exc:
                self.drop(session, str(exc))
                continue
            session.flush()

    def close_finished(self):
        """Drop the vanished; say bye to the served; close those whose bye is out."""
        for session in self:
            if session.dead:    # a write met EPIPE: SIGKILLed, or it closed its end
                self.drop(session, VANISHED)
                continue
            if session.state is State.DRAINING and session.outstanding <= 0:
                self.say_bye(session)
            if session.state is State.LEAVING and not session.outbuf:
                self._live.remove(session)
                session.enter(State.CLOSED)
                session.close()
                self.log.info("session.closed", session=session.sid,
                              files=session.files, **_lower(session.counts))

    def say_bye(self, session):
        session.enter(State.LEAVING)
        session.unchecked.close()           # free it: no re-checks after the bye
        self.send(session, protocol.bye(session.counts))
        session.flush()
        if session.dead:
            self.drop(session, VANISHED)

    def idle_limit(self, session):
        if session.spare:
            return min(self.idle_timeout, SPARE_IDLE)
        return self.idle_timeout

    def drop_idle(self):
        """Drop each session that has sent nothing, and waits for nothing, too long.

        Idle sessions would otherwise hold their places for ever: a hundred
        of them lock every other client out.
        """
        now = self.clock()
        for session in self:
            limit = self.idle_limit(session)
            if session.outstanding <= 0 and now - session.heard_at >= limit:
                self.refuse(session, f"idle for {limit:g}s")

    def idle_deadline(self):
        """When the next idle session is to be dropped, or None."""
        return min((s.heard_at + self.idle_limit(s) for s in self._live
                    if s.outstanding <= 0), default=None)

    def close_all(self, reason):
        """The server stops: tell every client still served why, and close."""
        for session in self:
            if not session.said_bye:
                session.say_goodbye(reason)
            session.close()
        self._live.clear()


def _lower(counts):
    return {k.lower(): v for k, v in sorted(counts.items())}
