"""The lister: walks a tree with os.scandir, never following a symlink.

It yields what the checkers must do with each entry.  Sidecars of files that
exist are skipped here (each checker reads its own file's sidecar); a
sidecar whose file is gone comes out as an orphan for a checker to confirm.
The listing also tells whether a file has a sidecar at all, so that a first
run does not try (and fail) to open one per file.
"""

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
    listed: bool = None  # was its sidecar in the listing? None: not looked
    where: tuple = None  # ORPHAN: (st_dev, st_ino) of the directory it was missed in


class Lister:
    def __init__(self, store_dir=None, excludes=()):
        self.store_dir = store_dir
        self.excludes = tuple(excludes)

    def walk(self, root):
        """Yield an Entry for everything under root, depth first, names sorted."""
        try:
            st = os.lstat(root)
        except OSError as exc:
            yield Entry(ERROR, root, reason=exc.strerror)
            return
        if not os.path.isdir(root) or os.path.islink(root):
            yield self.classify_single(root, st)
            return
        prefix = root if root.endswith("/") else root + "/"   # of every path below
        stack = [root]
        while stack:
            directory = stack.pop()
            subdirs = yield from self.list_dir(directory, os.path.abspath(directory), prefix)
            stack.extend(reversed(subdirs))

    def list_dir(self, directory, absdir, prefix):
        """Yield the entries of one directory; return its subdirectories.

        `absdir` is the directory made absolute once, so that no entry needs
        an os.path.abspath() of its own (a getcwd() each, for a relative root).
        """
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            yield Entry(ERROR, directory, reason=f"cannot list directory: {exc.strerror}")
            return []
        dirs = {e.name for e in entries if _is_dir(e)}
        files = {e.name for e in entries} - dirs
        mirror, sidecars = self.sidecars_of(directory, entries)
        subdirs, where = [], None          # where: the directory's identity, for orphans
        for e in entries:
            if self.excluded(e.path, prefix) or store.is_temp_name(e.name):
                continue
            if e.name in dirs:
                subdirs.append(e.path)
            elif mirror is None and e.name.endswith(store.SUFFIX):
                stem = e.name[:-len(store.SUFFIX)]
                path = os.path.join(directory, stem)
                if stem not in files and not self.excluded(path, prefix):
                    where = where or _identity(directory)
                    yield Entry(ORPHAN, path, os.path.join(absdir, stem),
                                os.path.join(absdir, e.name), where=where)
            else:
                yield self.classify(e, os.path.join(absdir, e.name),
                                    None if sidecars is None
                                    else e.name + store.SUFFIX in sidecars)
        if sidecars is not None and mirror is not None:
            yield from self.store_orphans(directory, absdir, prefix, mirror, sidecars,
                                          files)
        return subdirs

    def sidecars_of(self, directory, entries):
        """Return (the --store mirror directory or None, the sidecar names there).

        The names are None when the mirror cannot be listed: then each checker
        opens its sidecar and says why it cannot.
        """
        if self.store_dir is None:
            return None, {e.name for e in entries if e.name.endswith(store.SUFFIX)}
        mirror = os.path.dirname(store.sidecar_path(os.path.join(directory, "x"),
                                                    self.store_dir))
        try:
            names = os.listdir(mirror)
        except FileNotFoundError:
            names = []              # nothing of this directory is in the store yet
        except OSError:
            return mirror, None
        return mirror, {n for n in names if n.endswith(store.SUFFIX)}

    def classify(self, entry, key, listed=None):
        try:
            if entry.is_file(follow_symlinks=False):
                return Entry(FILE, entry.path, key, store.sidecar_path(key, self.store_dir),
                             size=entry.stat(follow_symlinks=False).st_size, listed=listed)
            return Entry(SKIP, entry.path,
                         reason=describe_kind(entry.stat(follow_symlinks=False).st_mode))
        except OSError as exc:
            return Entry(ERROR, entry.path, reason=exc.strerror)

    def classify_single(self, path, st):
        if stat.S_ISREG(st.st_mode):
            key = os.path.abspath(path)
            return Entry(FILE, path, key, store.sidecar_path(key, self.store_dir),
                         size=st.st_size)
        return Entry(SKIP, path, reason=describe_kind(st.st_mode))

    def store_orphans(self, directory, absdir, prefix, mirror, sidecars, files):
        """With --store, sidecars in the mirror directory whose file is gone."""
        where = None
        for name in sorted(sidecars):
            stem = name[:-len(store.SUFFIX)]
            if stem not in files:
                path = os.path.join(directory, stem)
                if not self.excluded(path, prefix) and not os.path.isdir(path):
                    where = where or _identity(directory)
                    yield Entry(ORPHAN, path, os.path.join(absdir, stem),
                                os.path.join(mirror, name), where=where)

    def excluded(self, path, prefix):
        """Does a pattern match the name, or the path below the root (`prefix`)?"""
        if not self.excludes:
            return False
        name, relative = os.path.basename(path), path[len(prefix):]
        return any(fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(relative, pat)
                   for pat in self.excludes)


def _identity(directory):
    """(st_dev, st_ino) of a directory, or None if it cannot be had."""
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _is_dir(entry):
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def describe_kind(mode):
    """Name the kind of a file that is not regular, for SKIPPED."""
    for test, name in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "not a regular file"
