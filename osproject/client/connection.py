"""The client's end of a session: a hello on the entrance, then two private FIFOs.

The client makes both FIFOs in a fresh 0700 directory beside the entrance
(the server accepts no FIFO anywhere else, so it never looks up a path on
some other file system), and holds the far end of each until the server's
welcome arrives, so that the server's non-blocking opens succeed and
neither side sees an EOF before the other has arrived.  Then the names are
removed: nothing is left behind whatever happens next.
"""

import errno
import os
import select
import shutil
import stat
import tempfile
import threading
import time

from .. import protocol

CONNECT_TIMEOUT = 5.0


class ClientError(Exception):
    """The client cannot do its job (exit status 2); str() says why."""


class Connection:
    """The client's end of a session: a hello, then two private FIFOs."""

    def __init__(self, entrance, timeout=CONNECT_TIMEOUT, private_dir=False):
        self.entrance = entrance
        self.timeout = timeout
        self.private_dir = private_dir      # the default location: it must be ours
        self.request_fd = self.reply_fd = -1
        self.lines = protocol.LineBuffer()
        self.send_lock = threading.Lock()
        self.session = None

    def open(self):
        """Say hello and wait for the welcome; raise ClientError if nobody answers.

        The entrance is judged before anything is made or written: nothing
        is ever written to a path that is not a server's FIFO.
        """
        entrance_fd = open_entrance(self.entrance, self.private_dir)
        try:
            # Beside the entrance as the server sees it (on macOS /tmp is
            # /private/tmp); the entrance itself is known not to be a link.
            beside = os.path.realpath(os.path.dirname(os.path.abspath(self.entrance)))
            try:
                private = tempfile.mkdtemp(prefix=protocol.CLIENT_DIR_PREFIX, dir=beside)
            except OSError as exc:
                raise ClientError(f"cannot make a private directory in {beside}: "
                                  f"{exc.strerror}") from None
            try:
                self._handshake(entrance_fd, os.path.join(private, "request"),
                                os.path.join(private, "reply"))
            except protocol.ProtocolError as exc:
                raise ClientError(str(exc)) from None
            except OSError as exc:
                raise ClientError(f"cannot set up the session FIFOs: {exc}") from None
            finally:
                shutil.rmtree(private, ignore_errors=True)     # the open fds live on
        finally:
            os.close(entrance_fd)

    def _handshake(self, entrance_fd, request, reply):
        os.mkfifo(request, 0o600)
        os.mkfifo(reply, 0o600)
        # Hold the far end of each FIFO ourselves until the server has opened
        # them: the server's non-blocking opens then succeed, and neither side
        # sees a spurious EOF before the other has arrived.
        self.reply_fd = os.open(reply, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        hold_reply = os.open(reply, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        hold_request = os.open(request, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self.request_fd = os.open(request, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._say_hello(entrance_fd, protocol.encode_hello(request, reply,
                                                               pid=os.getpid()))
            self._await_welcome()
        finally:
            os.close(hold_reply)
            os.close(hold_request)
        os.set_blocking(self.reply_fd, True)
        os.set_blocking(self.request_fd, True)

    def _say_hello(self, fd, hello):
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                os.write(fd, hello)     # <= PIPE_BUF: all or nothing
                return
            except BlockingIOError:     # the entrance is full of hellos
                if time.monotonic() > deadline:
                    raise ClientError("the server's entrance stays full") from None
                select.select([], [fd], [], 0.05)
            except BrokenPipeError:     # the server left since we opened it
                raise ClientError(self.nobody_listens()) from None

    def nobody_listens(self):
        return nobody_listens(self.entrance, self.private_dir)

    def _await_welcome(self):
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.reply_fd], [], [], left)[0]:
                raise ClientError(f"the server at {self.entrance} did not answer "
                                  f"within {self.timeout:g}s: our hello was lost or refused "
                                  "(its log says why), or the server is stuck")
            lines = self.lines.feed(os.read(self.reply_fd, 65536))
            if lines:
                frame = protocol.decode(lines[0]) if lines[0] else {}
                if "error" in frame:
                    raise ClientError(f"the server refused: {frame['error']}")
                try:
                    self.session = protocol.read_welcome(frame)  # our number in its log
                except protocol.ProtocolError as exc:
                    raise ClientError(str(exc)) from None
                self.leftover = lines[1:]
                return

    def send(self, frame):
        """Write one request; the lock keeps frames from different checkers whole."""
        self.send_data(protocol.encode(frame))

    def send_data(self, data):
        """Write one encoded frame, whole (see send)."""
        with self.send_lock:
            while data:
                data = data[os.write(self.request_fd, data):]

    def frames(self):
        """Yield reply frames until the server closes the reply FIFO; raise
        ClientError when it ends the session with an error frame."""
        for line in self.leftover:
            if line is None:
                raise protocol.ProtocolError("oversized reply")
            yield _unless_error(protocol.decode(line))
        while True:
            data = os.read(self.reply_fd, 65536)
            if not data:
                return
            for line in self.lines.feed(data):
                if line is None:
                    raise protocol.ProtocolError("oversized reply")
                yield _unless_error(protocol.decode(line))

    def finish_requests(self):
        """Tell the server we have nothing more to ask (EOF on the request FIFO)."""
        with self.send_lock:
            if self.request_fd >= 0:
                os.close(self.request_fd)
                self.request_fd = -1

    def close(self):
        self.finish_requests()
        if self.reply_fd >= 0:
            os.close(self.reply_fd)
            self.reply_fd = -1


def open_entrance(path, private_dir):
    """Open the server's entrance FIFO for writing; raise ClientError if it is not one.

    It must be a FIFO (not a symlink to one) owned by us or by root; the
    default location must also be a directory of ours with mode 0700, or
    anyone could have made it first.  The path is lstat'ed before the open,
    so a regular file, a device or a link is never even opened (opening some
    devices acts), and fstat'ed after it, to be sure it is that very FIFO.
    """
    nobody = nobody_listens(path, private_dir)
    if private_dir:
        _check_runtime_dir(os.path.dirname(path), nobody)
    before = _lstat(path, nobody)
    _check_entrance(before, path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
                     | os.O_NOCTTY)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENXIO):   # gone, or nobody reads it
            raise ClientError(nobody) from None
        raise ClientError(f"cannot open {path}: {exc.strerror}") from None
    after = os.fstat(fd)
    if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
        os.close(fd)
        raise ClientError(f"refusing {path}: it was replaced while it was opened")
    return fd


def _lstat(path, nobody):
    """lstat() the entrance or its directory; absent means no server there."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        raise ClientError(nobody) from None
    except OSError as exc:
        raise ClientError(f"cannot use {path}: {exc.strerror}") from None


def nobody_listens(path, private_dir):
    """What to tell the user when no server serves `path`."""
    return (f"no integrity-server is listening on {path}; start one with: "
            "integrity-server" + ("" if private_dir else f" --fifo {path}"))


def _check_entrance(st, path):
    if stat.S_ISLNK(st.st_mode):
        raise ClientError(f"refusing {path}: it is a symbolic link, not the server's FIFO")
    if not stat.S_ISFIFO(st.st_mode):
        raise ClientError(f"refusing {path}: it is not a FIFO, so no integrity-server "
                          "listens there (check --fifo or $INTEGRITY_FIFO)")
    if st.st_uid not in (os.geteuid(), 0):
        raise ClientError(f"refusing {path}: the FIFO belongs to uid {st.st_uid}, "
                          "not to us or root")


def _check_runtime_dir(directory, nobody):
    """The default runtime directory must be ours, a real directory, mode 0700."""
    st = _lstat(directory, nobody)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise ClientError(f"refusing {directory}: it must be a directory of ours with "
                          f"mode 0700 (someone else may have made it); remove it, or "
                          "choose another entrance with --fifo")


def _unless_error(frame):
    if "error" in frame:
        raise ClientError(f"the server ended the session: {frame['error']}")
    return frame

