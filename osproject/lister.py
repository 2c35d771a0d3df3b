"""The lister: walks a tree, never following a symlink below its root.

Each directory is opened and listed through an fd, and a subdirectory is
entered only if it is still the very directory (st_dev, st_ino) its parent
listed: a directory swapped for a symlink mid-run leads nowhere.  The same
identity travels with every file to the worker that hashes it, which opens
the directory again and refuses one that is not it.

The lister reads each file's sidecar while it holds the directory open, so
no sidecar is ever looked up by path either.  Sidecars of files that exist
are not entries of their own; a sidecar whose file is gone comes out as an
orphan for a checker to report.
"""

import errno
import fnmatch
import os
import stat
from typing import NamedTuple

from . import store

FILE, SKIP, ORPHAN, ERROR = "file", "skip", "orphan", "error"


class Entry(NamedTuple):
    kind: str           # FILE, SKIP, ORPHAN or ERROR
    path: str           # as the user will see it: their root joined with names
    key: str = None     # FILE, ORPHAN: its absolute path, as the server knows it
    sidecar: str = None  # FILE, ORPHAN: the absolute path of its sidecar
    reason: str = None
    size: int = 0       # lstat size of a FILE: lets the server balance big files
    expected: str = None  # FILE: the hash its sidecar holds; ORPHAN: the one it held
    dir: tuple = None   # FILE, ORPHAN: (st_dev, st_ino) of the directory it is in


class Lister:
    def __init__(self, store_dir=None, excludes=()):
        self.store_dir = store_dir
        self.excludes = tuple(excludes)

    def walk(self, root):
        """Yield an Entry for everything under root, depth first, names sorted.

        The root itself is taken as given: a symlink to a directory is the
        tree it names.  Below it, nothing is followed.
        """
        try:
            fd = store.open_directory(root)
        except NotADirectoryError:
            yield from self.single(root)
            return
        except OSError as exc:
            yield Entry(ERROR, root, reason=exc.strerror)
            return
        prefix = root if root.endswith("/") else root + "/"   # of every path below
        stack = [(root, fd)]        # below the root: (path, identity), opened when due
        while stack:
            directory, fd = stack.pop()
            if not isinstance(fd, int):
                try:
                    fd = store.open_directory(directory, fd)
                except OSError as exc:
                    yield Entry(ERROR, directory,
                                reason=f"cannot enter directory: {exc.strerror}")
                    continue
            try:
                subdirs = yield from self.list_dir(directory, fd, prefix)
            finally:
                os.close(fd)
            stack.extend(reversed(subdirs))

    def list_dir(self, directory, fd, prefix):
        """Yield the entries of one open directory; return its subdirectories
        as (path, identity) pairs."""
        absdir = os.path.abspath(directory)
        here = os.fstat(fd)
        identity = (here.st_dev, here.st_ino)
        try:
            with os.scandir(fd) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            yield Entry(ERROR, directory, reason=f"cannot list directory: {exc.strerror}")
            return []
        listing = _Listing(entries)
        sidecars = self.sidecars_of(absdir, fd, listing)
        subdirs = []
        for e in entries:
            path = os.path.join(directory, e.name)
            if self.excluded(path, prefix) or store.is_temp_name(e.name):
                continue
            if e.name in listing.dirs:
                st = listing.stat(e)
                if st is not None:
                    subdirs.append((path, (st.st_dev, st.st_ino)))
                continue
            if sidecars.local and e.name.endswith(store.SUFFIX):
                stem = e.name[:-len(store.SUFFIX)]
                if stem in listing.names:
                    continue            # a sidecar: read with its file
                orphan = self.orphan(path[:-len(store.SUFFIX)], absdir, e.name, identity,
                                     sidecars, prefix)
                if orphan is not None:
                    yield orphan
                continue
            yield self.classify(e, path, absdir, identity, listing, sidecars)
        yield from self.store_orphans(directory, absdir, identity, listing, sidecars,
                                      prefix)
        return subdirs

    def sidecars_of(self, absdir, fd, listing):
        """Where this directory's sidecars are, and which exist there."""
        if self.store_dir is None:
            return _Sidecars(fd, {n for n in listing.names if n.endswith(store.SUFFIX)},
                             None, absdir)
        mirror = os.path.dirname(store.sidecar_path(os.path.join(absdir, "x"),
                                                    self.store_dir))
        try:
            mirror_fd = store.open_store_directory(mirror)
        except FileNotFoundError:
            return _Sidecars(None, set(), None, mirror)   # none of this directory yet
        except OSError as exc:
            return _Sidecars(None, set(), f"store directory {mirror}: {_strerror(exc)}",
                             mirror)
        try:
            names = {n for n in os.listdir(mirror_fd) if n.endswith(store.SUFFIX)}
        except OSError as exc:
            os.close(mirror_fd)
            return _Sidecars(None, set(), f"store directory {mirror}: {_strerror(exc)}",
                             mirror)
        return _Sidecars(mirror_fd, names, None, mirror, own_fd=True)

    def classify(self, e, path, absdir, identity, listing, sidecars):
        """The Entry of one name that is not a directory."""
        st = listing.stat(e)
        if st is None:
            return Entry(ERROR, path, reason=listing.error(e))
        if not stat.S_ISREG(st.st_mode):
            return Entry(SKIP, path, reason=describe_kind(st.st_mode))
        return self.file_entry(path, os.path.join(absdir, e.name), e.name, st.st_size,
                               identity, sidecars)

    def file_entry(self, path, key, name, size, identity, sidecars):
        """A regular file, with the hash its sidecar holds (ERROR if unreadable)."""
        sidecar = store.sidecar_path(key, self.store_dir)
        if sidecars.error:
            return Entry(ERROR, path, reason=sidecars.error)
        try:
            expected = sidecars.read(name)
        except store.SidecarError as exc:
            return Entry(ERROR, path, reason=str(exc))
        return Entry(FILE, path, key, sidecar, size=size, expected=expected, dir=identity)

    def orphan(self, path, absdir, sidecar_name, identity, sidecars, prefix):
        """A sidecar whose file is gone: MISSING if it is ours, else a file to check."""
        stem = sidecar_name[:-len(store.SUFFIX)]
        if self.excluded(path, prefix):
            return None
        try:
            recorded = sidecars.read(stem)
        except store.SidecarError:
            recorded = None
        key = os.path.join(absdir, stem)
        if recorded is None:        # not one of ours: someone's file named *.md5
            return self.file_entry(path + store.SUFFIX, key + store.SUFFIX, sidecar_name,
                                   0, identity, sidecars)
        return Entry(ORPHAN, path, key, os.path.join(sidecars.where, sidecar_name),
                     expected=recorded, dir=identity)

    def store_orphans(self, directory, absdir, identity, listing, sidecars, prefix):
        """With --store, sidecars in the mirror directory whose file is gone."""
        if sidecars.local:
            return
        try:
            for name in sorted(sidecars.names):
                stem = name[:-len(store.SUFFIX)]
                if stem in listing.names:
                    continue
                path = os.path.join(directory, stem)
                if self.excluded(path, prefix):
                    continue
                try:
                    recorded = sidecars.read(stem)
                except store.SidecarError:
                    recorded = None
                if recorded is not None:
                    yield Entry(ORPHAN, path, os.path.join(absdir, stem),
                                os.path.join(sidecars.where, name), expected=recorded,
                                dir=identity)
        finally:
            sidecars.close()

    def single(self, root):
        """A root that is not a directory: that one file, reached from its directory."""
        directory, name = os.path.split(os.path.abspath(root))
        try:
            fd = store.open_directory(directory)
        except OSError as exc:
            yield Entry(ERROR, root, reason=exc.strerror)
            return
        try:
            here = os.fstat(fd)
            st = os.lstat(name, dir_fd=fd)
            if self.is_own_sidecar(name, fd):   # `integrity-client dir/*` names them too
                yield from self.single_sidecar(root, directory, name, here, fd)
                return
            if not stat.S_ISREG(st.st_mode):
                yield Entry(SKIP, root, reason=describe_kind(st.st_mode))
                return
            listing = _Listing([], names={name, name + store.SUFFIX})
            sidecars = self.sidecars_of(directory, fd, listing)
            try:
                yield self.file_entry(root, os.path.join(directory, name), name,
                                      st.st_size, (here.st_dev, here.st_ino), sidecars)
            finally:
                sidecars.close()
        except OSError as exc:
            yield Entry(ERROR, root, reason=exc.strerror)
        finally:
            os.close(fd)

    def is_own_sidecar(self, name, fd):
        """Is `name`, given as a root, a sidecar of ours (beside its file)?"""
        if self.store_dir is not None or not name.endswith(store.SUFFIX):
            return False
        try:
            return store.read_baseline(name, name[:-len(store.SUFFIX)], dir_fd=fd) is not None
        except store.SidecarError:
            return False

    def single_sidecar(self, root, directory, name, here, fd):
        """A sidecar given as a root: nothing if its file is there (checked as
        a root of its own, or not asked for), else that file is MISSING."""
        stem = name[:-len(store.SUFFIX)]
        try:
            os.lstat(stem, dir_fd=fd)
            return
        except FileNotFoundError:
            pass
        sidecars = _Sidecars(fd, {name}, None, directory)
        yield self.orphan(root[:-len(store.SUFFIX)], directory, name,
                          (here.st_dev, here.st_ino), sidecars, "")

    def excluded(self, path, prefix):
        """Does a pattern match the name, or the path below the root (`prefix`)?"""
        if not self.excludes:
            return False
        name, relative = os.path.basename(path), path[len(prefix):]
        return any(fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(relative, pat)
                   for pat in self.excludes)


class _Listing:
    """The names of one directory, and their lstat() through its fd."""

    def __init__(self, entries, names=None):
        self.names = names if names is not None else {e.name for e in entries}
        self.dirs = {e.name for e in entries if _is_dir(e)}
        self._errors = {}

    def stat(self, e):
        try:
            return e.stat(follow_symlinks=False)
        except OSError as exc:
            self._errors[e.name] = exc.strerror
            return None

    def error(self, e):
        return self._errors.get(e.name, "cannot stat")


class _Sidecars:
    """One directory's sidecars: an fd of where they are and the names there."""

    def __init__(self, fd, names, error, where, own_fd=False):
        self.fd, self.names, self.error, self.where = fd, names, error, where
        self.local = not own_fd and error is None and fd is not None
        self._own = own_fd

    def read(self, name):
        """The hash recorded for `name`, None when it has no sidecar."""
        sidecar = name + store.SUFFIX
        if sidecar not in self.names:
            return None
        return store.read_baseline(sidecar, name, dir_fd=self.fd)

    def close(self):
        if self._own and self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _is_dir(entry):
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _strerror(exc):
    return exc.strerror or str(exc)


def describe_kind(mode):
    """Name the kind of a file that is not regular, for SKIPPED."""
    for test, name in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "not a regular file"
