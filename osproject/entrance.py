"""The entrance: the well-known FIFO through which clients say hello."""

import errno
import os
import stat

from . import protocol


class EntranceError(Exception):
    """The entrance FIFO cannot be used; str() says why and what to do."""


def default_fifo():
    """$INTEGRITY_FIFO, else a private runtime directory of this user."""
    if os.environ.get("INTEGRITY_FIFO"):
        return os.environ["INTEGRITY_FIFO"]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = os.path.join(runtime, "osproject") if runtime else f"/tmp/osproject-{os.geteuid()}"
    return os.path.join(base, "server.fifo")


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
        self.directory = None
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
