"""Sidecars: `<file>.md5` in md5sum's format, written atomically, never through a link.

A sidecar holds one line, `HASH  NAME\\n`, NAME being the file's basename.
Like GNU md5sum, a name containing a backslash, newline or carriage return
is escaped (\\\\, \\n, \\r) and the line then starts with a backslash, so
`cd dir && md5sum -c file.md5` agrees with us for any name.
"""

import errno
import itertools
import os
import re
import stat
import sys
from collections.abc import Sequence

SUFFIX = ".md5"
MAX_SIDECAR = 64 * 1024  # a real sidecar is one line: hash, two spaces, a name
_LINE = re.compile(rb"(\\?)([0-9a-fA-F]{32}) [ *](.*)", re.DOTALL)
_BSD_LINE = re.compile(rb"(\\?)MD5 \((.*)\) = ([0-9a-fA-F]{32})", re.DOTALL)
_ESCAPES = {b"\\": b"\\\\", b"\n": b"\\n", b"\r": b"\\r"}
_UNESCAPE = re.compile(rb"\\(.)", re.DOTALL)
# What os.fsencode() does to a str, without its Python-level call: name.encode(*FS_CODEC).
FS_CODEC = (sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())
_HEX_DIGITS = b"0123456789abcdefABCDEF"
TEMP_ATTEMPTS = 100      # names taken by a dead process of the same pid: skip on


class _TempNames:
    """`.osp-PID-N.tmp`: unique per process without a syscall per name.

    The pid is what the server's clean-up of a killed worker's temps goes
    by; it is re-read in a forked child.
    """

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.pid, self.numbers = os.getpid(), itertools.count()

    def next(self) -> str:
        return f".osp-{self.pid}-{next(self.numbers)}.tmp"


_temp_names = _TempNames()
_TEMP_NAME = re.compile(r"\.osp-\d+-\d+\.tmp")


def is_temp_name(name: str) -> bool:
    """Is `name` one of our temp sidecars, in flight or left by a killed worker?"""
    return name.startswith(".osp-") and _TEMP_NAME.fullmatch(name) is not None


class SidecarError(Exception):
    """A sidecar that cannot be read or written; str() says why."""


def format_line(md5: str, name: str | bytes) -> bytes:
    """Return the md5sum line (bytes) for a file called `name` (str or bytes)."""
    raw = os.fsencode(name)
    escaped = re.sub(rb"[\\\n\r]", lambda m: _ESCAPES[m.group()], raw)
    prefix = b"\\" if escaped != raw else b""
    return prefix + md5.encode("ascii") + b"  " + escaped + b"\n"


def parse_line(line: bytes) -> tuple[str, bytes]:
    """Return (md5, name as bytes) from one md5sum line, or raise SidecarError.

    As `md5sum -c` does, it takes a CRLF line end and the BSD form
    (`MD5 (NAME) = HASH`, as `md5sum --tag` and macOS's md5 write).
    """
    line = line[:-1] if line.endswith(b"\n") else line
    line = line[:-1] if line.endswith(b"\r") else line   # a raw CR in a name is escaped
    # The common line, `HASH  NAME` with nothing escaped, without the regex:
    # what _LINE makes of it, to the byte.
    if line[32:34] == b"  " and not line[:32].translate(None, _HEX_DIGITS) \
            and b"\n" not in line:
        return line[:32].decode("ascii").lower(), line[34:]
    match = _LINE.fullmatch(line)
    if match:
        escaped, md5, name = match.groups()
    else:
        match = _BSD_LINE.fullmatch(line)
        if not match:
            raise SidecarError("not an md5sum line")
        escaped, name, md5 = match.groups()
    if escaped:
        def unescape(m: re.Match[bytes]) -> bytes:
            if m.group(1) not in b"\\nr":
                raise SidecarError("bad escape in md5sum line")
            return {b"\\": b"\\", b"n": b"\n", b"r": b"\r"}[m.group(1)]
        name = _UNESCAPE.sub(unescape, name)
    elif b"\n" in name:
        raise SidecarError("more than one line")
    return md5.decode("ascii").lower(), name


def sidecar_path(path: str, store: str | None = None) -> str:
    """Return where the sidecar of `path` lives: beside it, or mirrored under store."""
    if store is None:
        return path + SUFFIX
    return os.path.join(store, os.path.abspath(path).lstrip("/")) + SUFFIX


def read_baseline(sidecar: str, name: str, dir_fd: int | None = None) -> str | None:
    """Return the hash a sidecar records for `name`, or None when there is none.

    Raises SidecarError for a sidecar that exists but is not ours to trust:
    a symlink, not a regular file, not one md5sum line naming this file.
    With dir_fd, `sidecar` is a name in that directory.
    """
    try:
        fd = os.open(sidecar, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SidecarError(_why(exc, sidecar)) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SidecarError(f"sidecar {_show(sidecar)} is not a regular file")
        data = os.read(fd, MAX_SIDECAR + 1)
    except OSError as exc:
        raise SidecarError(_why(exc, sidecar)) from None
    finally:
        os.close(fd)
    if len(data) > MAX_SIDECAR:
        raise SidecarError(f"sidecar {_show(sidecar)} is too large to be ours")
    try:
        md5, recorded = parse_line(data)
    except SidecarError as exc:
        raise SidecarError(f"sidecar {_show(sidecar)}: {exc}") from None
    if recorded != (name.encode(*FS_CODEC) if type(name) is str else os.fsencode(name)):
        raise SidecarError(f"sidecar {_show(sidecar)} names another file")
    return md5


def write_sidecar(sidecar: str, md5: str, name: str, replace: bool,
                  dir_fd: int | None = None) -> bool:
    """Atomically write the sidecar of `name`; return True if written.

    The temp file is created O_EXCL|O_NOFOLLOW in the sidecar's directory and
    renamed over it, so a planted symlink or hard link is replaced, never
    written through.  With replace False an existing sidecar is left alone
    (link(2) refuses to clobber) and False is returned; on Linux the new
    sidecar is then an O_TMPFILE file, named by linkat(2) (_link_anonymous).  With dir_fd,
    `sidecar` is a name in that directory: nothing is looked up by path.
    """
    if dir_fd is None:
        directory, sidecar = os.path.split(sidecar)
        fd = open_directory(directory or ".")
        try:
            return write_sidecar(sidecar, md5, name, replace, dir_fd=fd)
        finally:
            os.close(fd)
    if not replace:
        written = _link_anonymous(sidecar, format_line(md5, name), dir_fd)
        if written is not None:
            return written
    tmp, fd = _create_temp(dir_fd)
    try:
        try:
            os.write(fd, format_line(md5, name))
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, sidecar, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            return True
        try:
            os.link(tmp, sidecar, src_dir_fd=dir_fd, dst_dir_fd=dir_fd,
                    follow_symlinks=False)
        except FileExistsError:
            return False
        return True
    finally:
        _unlink_quietly(tmp, dir_fd)  # gone already after a successful os.replace


_O_TMPFILE = getattr(os, "O_TMPFILE", 0)
_PROC_FD = "/proc/self/fd"
# O_TMPFILE unknown to the kernel or the file system, or no /proc to link from
_NO_TMPFILE = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT}


def _link_anonymous(sidecar: str, data: bytes, dir_fd: int) -> bool | None:
    """Write a new sidecar as an unnamed file, then give it its name: True if
    written, False if the name is taken, None where this cannot be done.

    Linux: O_TMPFILE makes a file with no name in the directory, and
    linkat(2) through /proc/self/fd names it, refusing, like link(2) in the
    general way, to clobber anything there.  One directory operation in
    place of three (create a temp name, link, unlink it), and nothing is
    left behind by a worker killed in between.
    """
    if not _O_TMPFILE:
        return None
    try:
        fd = os.open(".", os.O_WRONLY | _O_TMPFILE | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in _NO_TMPFILE:
            return None
        raise
    try:
        os.write(fd, data)
        try:
            os.link(f"{_PROC_FD}/{fd}", sidecar, dst_dir_fd=dir_fd, follow_symlinks=True)
        except FileExistsError:
            return False
        except FileNotFoundError:
            if os.path.isdir(_PROC_FD):
                raise                   # the directory itself went away
            return None
        return True
    finally:
        os.close(fd)


def _create_temp(dir_fd: int) -> tuple[str, int]:
    """Create a fresh temp file in the directory, O_EXCL|O_NOFOLLOW; return (name, fd)."""
    for _ in range(TEMP_ATTEMPTS):
        tmp = _temp_names.next()
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temp file name")


def discard_sidecar(sidecar: str, name: str, dir_fd: int | None = None) -> bool:
    """Remove the sidecar of `name`; return True if removed.

    Only a regular file holding one md5sum line for this very name is a
    sidecar: anything else (a link, a user's other file) is left alone.
    With dir_fd, `sidecar` is a name in that directory.
    """
    try:
        if read_baseline(sidecar, name, dir_fd) is None:
            return False
        os.unlink(sidecar, dir_fd=dir_fd)
    except (SidecarError, OSError):
        return False
    return True


class DirectoryReplaced(OSError):
    """A directory is not the one that was listed: it was swapped meanwhile."""


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK | os.O_CLOEXEC


def open_directory(path: str, identity: Sequence[int] | None = None) -> int:
    """Open a directory; with identity, only the very one (st_dev, st_ino) names.

    This is how anything below a checked root is reached: the lister saw
    the directory's identity in its parent, and a path that now resolves
    elsewhere (a directory swapped for a symlink into another tree) is
    refused with DirectoryReplaced instead of being read or written.
    """
    fd = os.open(path, _DIR_FLAGS)
    if identity is not None:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != tuple(identity):
            os.close(fd)
            raise DirectoryReplaced(errno.ESTALE, "its directory was replaced since "
                                    "it was listed", path)
    return fd


def open_store_directory(path: str, create: bool = False) -> int:
    """Open a --store mirror directory, following no symlink on the way.

    The store's own path is resolved once by the client (realpath), so a
    symlink met here was planted: each component is opened O_NOFOLLOW
    relative to its parent, from the root of the file system.  With create,
    missing components are made (mode 0700).
    """
    fd = os.open("/", _DIR_FLAGS)
    try:
        for part in os.fsencode(path).split(b"/"):
            if not part:
                continue
            try:
                child = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(part, 0o700, dir_fd=fd)
                except FileExistsError:
                    pass
                child = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unlink_quietly(name: str, dir_fd: int | None = None) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _show(path: str) -> str:
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _why(exc: OSError, path: str) -> str:
    if exc.errno == errno.ELOOP:
        return f"sidecar {_show(path)} is a symlink"
    return f"sidecar {_show(path)}: {exc.strerror}"
