"""The entrance: the well-known FIFO through which clients say hello."""

import errno
import os
import stat
import time

from .. import protocol

# Clients give up their handshake after 5 seconds (connection.CONNECT_TIMEOUT):
# a client directory older than this, whose FIFOs nobody holds, was left by
# a client that died meanwhile.
STALE_CLIENT_DIR = 10.0
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class EntranceError(Exception):
    """The entrance FIFO cannot be used; str() says why and what to do."""


def ensure_private_dir(path):
    """Create `path` mode 0700, or check that an existing one is ours and private."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() \
            or st.st_mode & 0o077:
        raise EntranceError(f"{path} must be a directory of ours with mode 0700; "
                            "refusing to use it")


class Entrance:
    """Create the FIFO, keep it open both ways, read hellos, remove it at the end."""

    def __init__(self, path, private_dir=False):
        self.path = os.path.abspath(path)
        self.private_dir = private_dir      # the default location: we own its dir
        self.fd = self._writer = -1
        self._identity = None
        # Where clients make their FIFO directories, symlinks resolved as the
        # client resolves them (on macOS /tmp is /private/tmp).
        self.directory: str | None = None     # known once open()
        self.lines = protocol.LineBuffer(limit=protocol.HELLO_MAX)

    def beside(self, path):
        """Is `path` in a client's directory beside the entrance, as clients make them?

        Only there are FIFOs accepted: the server then never lstat()s or
        opens a path on another file system (a hung NFS mount would block
        the loop).  The path must be normalized: no '..' leads out.
        """
        directory = os.path.dirname(path)
        return (os.path.normpath(path) == path
                and os.path.dirname(directory) == self.directory
                and os.path.basename(directory).startswith(protocol.CLIENT_DIR_PREFIX))

    def open(self):
        """Make the FIFO exist and listen on it; raise EntranceError if we may not."""
        if self.private_dir:
            ensure_private_dir(os.path.dirname(self.path))
        try:
            protocol.longest_hello(os.path.realpath(os.path.dirname(self.path)))
        except protocol.ProtocolError as exc:
            raise EntranceError(f"no client could say hello on {self.path}: {exc}; "
                                "choose a shorter --fifo") from None
        self._clear_stale()
        try:
            os.mkfifo(self.path, 0o600)
        except OSError as exc:
            raise EntranceError(f"cannot create {self.path}: {exc.strerror}") from None
        self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        # Our own writer keeps the FIFO from reporting EOF after each client,
        # which would make select() spin.
        self._writer = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        st = os.fstat(self.fd)
        self._identity = (st.st_dev, st.st_ino)
        self.directory = os.path.realpath(os.path.dirname(self.path))

    def is_ours(self):
        """Is the FIFO at our path still the very one we made?

        Tmp cleaners delete old files; another server may then make its own.
        """
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._identity

    def recreate(self):
        """Make the FIFO anew after it was deleted; raise EntranceError if it is
        not simply gone (replaced by a file, or by another server's FIFO)."""
        if os.path.lexists(self.path):
            raise EntranceError(f"{self.path} was replaced by something that is not "
                                "ours; leaving it to whoever made it")
        self.close()
        self.lines = protocol.LineBuffer(limit=protocol.HELLO_MAX)
        self.open()

    def _clear_stale(self):
        """Remove a FIFO of ours that nobody serves; refuse anything else."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISFIFO(st.st_mode) or st.st_uid != os.geteuid():
            raise EntranceError(f"{self.path} exists and is not our FIFO; "
                                "refusing to touch it (choose another with --fifo)")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise EntranceError(f"{self.path}: {exc.strerror}") from None
            os.unlink(self.path)    # no reader: left behind by a server that died
            return
        os.close(fd)
        raise EntranceError(f"another server is already serving {self.path}")

    def sweep(self, now=None):
        """Remove the client directories that dead clients left beside the
        entrance; return how many.

        A client killed during its handshake leaves its osp-client-*
        directory for ever.  One goes only if it is a directory (not a
        symlink) of our uid, older than STALE_CLIENT_DIR, holding nothing but
        FIFOs of ours that nobody holds open.  Everything is reached through
        directory fds, never through a link.
        """
        now = time.time() if now is None else now
        if self.directory is None:      # not open yet: nothing of ours to sweep
            return 0
        try:
            parent = os.open(self.directory, _DIR_FLAGS & ~os.O_NOFOLLOW)
        except OSError:
            return 0
        try:
            return sum(_remove_if_stale(parent, name, now) for name in os.listdir(parent)
                       if name.startswith(protocol.CLIENT_DIR_PREFIX))
        except OSError:
            return 0
        finally:
            os.close(parent)

    def read_lines(self):
        """Return the complete hello lines now readable (None for an oversized one)."""
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        return self.lines.feed(data)

    def close(self):
        """Stop accepting clients: the FIFO exists exactly while we serve."""
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        for fd in (self.fd, self._writer):
            if fd >= 0:
                os.close(fd)
        self.fd = self._writer = -1


def _remove_if_stale(parent, name, now):
    """Remove client directory `name` of `parent` if a dead client left it."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)    # ELOOP for a symlink
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or now - st.st_mtime < STALE_CLIENT_DIR:
            return False
        names = os.listdir(fd)
        if not all(_abandoned_fifo(fd, n) for n in names):
            return False
        for n in names:
            os.unlink(n, dir_fd=fd)
        os.rmdir(name, dir_fd=parent)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _abandoned_fifo(dir_fd, name):
    """Is `name` a FIFO of ours that nobody has open for reading?

    A live client holds a reader on both of its FIFOs until the names are
    gone; opening one for writing without blocking then succeeds.
    """
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISFIFO(st.st_mode) or st.st_uid != os.geteuid():
        return False
    try:
        probe = os.open(name, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC,
                        dir_fd=dir_fd)
    except OSError as exc:
        return exc.errno == errno.ENXIO
    os.close(probe)
    return False
