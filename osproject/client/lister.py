"""The lister: walks a tree, never following a symlink below its root.

Each directory is opened and listed through an fd, and a subdirectory is
entered only if it is still the very directory (st_dev, st_ino) its parent
listed: a directory swapped for a symlink mid-run leads nowhere.  The same
identity travels with every file to the worker that hashes it, which opens
the directory again and refuses one that is not it.

For each directory the lister reads what the catalog recorded there (one
query), and judges at once everything that needs no hashing: directories,
symlinks and special files by their attributes, entries gone since (MISSING,
with everything below a deleted directory).  Regular files go on to the
checkers as an Entry, with the hash to check them against and what their
sidecar says; sidecars are read here, relative to the directory's fd.
"""

import fnmatch
import os
import stat
from typing import Any, NamedTuple

from .. import store
from . import catalog as catalog_mod
from . import findings


class Entry(NamedTuple):
    """A regular file for a worker to hash."""
    path: str               # as the user will see it: their root joined with names
    key: str                # its absolute path, as the server and the catalog know it
    sidecar: str | None     # the absolute path of its sidecar; None: it can have none
    size: int               # lets the server balance big files
    expected: str | None    # the hash to check it against: the catalog's, else the sidecar's
    dir: tuple              # (st_dev, st_ino) of the directory it is in
    was: object             # the catalog's Record, or None
    now: object             # its Record from lstat, without a hash yet
    sidecar_md5: str | None = None      # what its sidecar holds
    sidecar_error: str | None = None    # why its sidecar could not be read
    covered: bool = False   # under a root the catalog knew before this run
    note: str | None = None     # something the user should hear of, even on a first run


class Lister:
    def __init__(self, store_dir=None, excludes=(), catalog=None, update=False):
        self.store_dir = store_dir
        self.excludes = tuple(p for p in excludes if not p.startswith("/"))
        self.absolute_excludes = tuple(p for p in excludes if p.startswith("/"))
        self.catalog = catalog
        self.update = update
        # A --store inside a tree it serves is ours, not the tree's: never listed
        # (its sidecars would otherwise get sidecars of their own, run after run).
        self.store_identity = _identity(store_dir) if store_dir else None

    def walk(self, root):
        """Yield an Entry or a Finding for everything under root, depth first.

        The root itself is taken as given: a symlink to a directory is the
        tree it names.  Below it, nothing is followed.
        """
        key = os.path.abspath(root)
        covered = self.catalog is not None and self.catalog.knows_root(key)
        fd: int | tuple[int, int]   # an open directory, or the identity of one to open
        try:
            fd = store.open_directory(root)
        except NotADirectoryError:
            yield from self.single(root, covered)
            return
        except OSError as exc:
            yield from self.unopened(root, key, exc)
            return
        here = os.fstat(fd)
        yield findings.of_entry(root, key, self.recorded(key), _record(key, here), covered,
                                self.update)
        prefix = root if root.endswith("/") else root + "/"   # of every path below
        # below the root: (path, identity, finding), opened when due
        stack: list[tuple[str, int | tuple[int, int], Any]] = [(root, fd, None)]
        while stack:
            directory, fd, finding = stack.pop()
            if not isinstance(fd, int):
                try:
                    fd = store.open_directory(directory, fd)
                except OSError as exc:
                    yield finding._replace(status=findings.ERROR, stage=None, forget=False,
                                           error=f"cannot enter directory: {exc.strerror}",
                                           altered=finding.was is not None)
                    continue
                yield finding       # a directory is judged once it is entered
            try:
                subdirs = yield from self.list_dir(directory, fd, prefix, covered)
            finally:
                os.close(fd)
            stack.extend(reversed(subdirs))

    def unopened(self, root, key, exc):
        """A root that cannot be opened: MISSING if the catalog had it, else ERROR."""
        was = self.recorded(key)
        if isinstance(exc, FileNotFoundError) and was is not None:
            yield findings.missing(root, key, was, self.update)
            if was.kind == catalog_mod.DIR:
                yield from self.gone_below(key, root, "")
            return
        yield findings.failed(root, key, was, exc.strerror)

    def recorded(self, key):
        return None if self.catalog is None else self.catalog.get(key)

    def list_dir(self, directory, fd, prefix, covered):
        """Yield the entries of one open directory; return its subdirectories
        as (path, identity, their finding) for walk() to enter."""
        absdir = os.path.abspath(directory)
        here = os.fstat(fd)
        identity = (here.st_dev, here.st_ino)
        try:
            # Names only, not DirEntry objects with their cached stat: a
            # directory of 100,000 files costs its names, not 100 MiB.
            names = sorted(os.listdir(fd))
        except OSError as exc:
            yield findings.failed(directory, absdir, self.recorded(absdir),
                                  f"cannot list directory: {exc.strerror}")
            return []
        # name (str, as listed) -> Record: no os.fsencode() per name looked up
        recorded = self.catalog.children_named(absdir) if self.catalog is not None else {}
        if not covered and recorded:    # a known tree inside a new root
            covered = self.catalog.knows_root(absdir)
        listing = _Listing(names, fd)
        sidecars = self.sidecars_of(absdir, fd, listing, recorded)
        context = _Context(directory, absdir, identity, prefix, covered, recorded, sidecars,
                           _joiner(directory), _joiner(absdir))
        subdirs: list[tuple[str, tuple[int, int], Any]] = []
        try:
            yield from self.entries(names, listing, context, fd, subdirs)
            yield from self.gone(context, listing)
        finally:
            sidecars.close()
        return subdirs

    def entries(self, names, listing, context, fd, subdirs):
        """Yield what each listed name is; put its subdirectories in `subdirs`."""
        below, abs_below, prefix = context.below, context.abs_below, context.prefix
        skip, recorded = context.sidecars.skip, context.recorded
        excluding = self.excludes or self.absolute_excludes
        plain = self.store_identity is None     # no --store mirror to leave out
        for name in names:
            if name in skip:
                continue
            path = below + name         # os.path.join(directory, name)
            if excluding and self.excluded(path, prefix):
                continue
            st = listing.stat(name)
            if st is None:
                if name in listing.vanished:
                    listing.names.discard(name)     # gone since the listing: as if unlisted
                    continue
            elif stat.S_ISREG(st.st_mode) and plain and not name.startswith(".osp-"):
                # The common case, as judge() would take it, without a generator:
                # a regular file that is no temp sidecar of ours.
                was = recorded.get(name)
                yield self.file_entry(path, abs_below + name, name, st, context, was)
                if was is not None and was.kind == catalog_mod.DIR:
                    yield from self.gone_below(abs_below + name, path, prefix)
                continue
            elif (st.st_dev, st.st_ino) == self.store_identity or \
                    store.is_temp_name(name) and _looks_like_temp(st):
                continue
            for found in self.judge(name, path, st, listing, context, fd):
                if st is not None and stat.S_ISDIR(st.st_mode) and found.path == path:
                    subdirs.append((path, (st.st_dev, st.st_ino), found))
                else:
                    yield found

    def judge(self, name, path, st, listing, context, fd):
        """What one listed name is: a Finding, or an Entry for the checkers."""
        key = context.abs_below + name      # os.path.join(context.absdir, name)
        was = context.recorded.get(name)
        if st is None:
            yield findings.failed(path, key, was, listing.error(name))
            return
        if stat.S_ISREG(st.st_mode):
            yield self.file_entry(path, key, name, st, context, was)
        else:
            target = _readlink(name, fd) if stat.S_ISLNK(st.st_mode) else None
            yield findings.of_entry(path, key, was, _record(key, st, target),
                                    context.covered, self.update, dir=context.identity)
        if was is not None and was.kind == catalog_mod.DIR and not stat.S_ISDIR(st.st_mode):
            yield from self.gone_below(key, path, context.prefix)   # what it held is gone

    def file_entry(self, path, key, name, st, context, was):
        """A regular file, with the hash to check it against (`was`: the
        catalog's Record of it, or None)."""
        sidecars = context.sidecars
        sidecar_md5 = sidecar_error = None
        if name in sidecars.taken:
            sidecar = None
        elif self.store_dir is None:
            sidecar = key + store.SUFFIX        # store.sidecar_path(key), inline
        else:
            sidecar = store.sidecar_path(key, self.store_dir)
        if sidecar is not None:
            if sidecars.error:
                sidecar_error = sidecars.error
            else:
                try:
                    sidecar_md5 = sidecars.read(name)
                except store.SidecarError as exc:
                    sidecar_error = str(exc)
                    sidecars.unless_regular(name + store.SUFFIX)
        if was is not None and was.kind == catalog_mod.FILE:
            expected = was.md5
        elif sidecar_error and was is None:     # a sidecar we cannot read is never overwritten
            return findings.failed(path, key, None, sidecar_error)
        else:
            expected = sidecar_md5
        return Entry(path, key, sidecar, st.st_size, expected, context.identity, was,
                     _record(key, st), sidecar_md5, sidecar_error, context.covered,
                     sidecars.notes.get(name))

    def gone(self, context, listing):
        """What the catalog has here and the listing no longer finds."""
        gone = set(context.recorded).difference(listing.names)
        for name in sorted(gone, key=os.fsencode):      # in the order of their bytes
            path = os.path.join(context.directory, name)
            if self.excluded(path, context.prefix):
                continue
            was = context.recorded[name]
            key = os.path.join(context.absdir, name)
            yield findings.missing(path, key, was, self.update, dir=context.identity,
                                   sidecar=self.sidecar_of(was, key))
            if was.kind == catalog_mod.DIR:
                yield from self.gone_below(key, path, context.prefix)
        for stem, recorded in sorted(context.sidecars.orphans.items()):
            path = os.path.join(context.directory, stem)
            if self.excluded(path, context.prefix):
                continue
            key = os.path.join(context.absdir, stem)
            yield findings.missing(path, key, None, self.update, expected=recorded,
                                   sidecar=store.sidecar_path(key, self.store_dir),
                                   dir=context.identity)

    def gone_below(self, key, path, prefix):
        """Everything the catalog had below a directory that is gone."""
        start = len(os.fsencode(key))
        for was in self.catalog.subtree(key):
            below = path + os.fsdecode(was.path[start:])
            if not self.excluded(below, prefix):
                yield findings.missing(below, os.fsdecode(was.path), was, self.update)

    def sidecar_of(self, was, key):
        return store.sidecar_path(key, self.store_dir) if was.kind == catalog_mod.FILE \
            else None

    def sidecars_of(self, absdir, fd, listing, recorded):
        """Where this directory's sidecars are, and which names are ours."""
        if self.store_dir is None:
            sidecars = _Sidecars(fd, listing.names, None, absdir)
            sidecars.sort_out(listing.names, recorded)
            return sidecars
        mirror = os.path.dirname(store.sidecar_path(os.path.join(absdir, "x"),
                                                    self.store_dir))
        try:
            mirror_fd = store.open_store_directory(mirror)
        except FileNotFoundError:
            return _Sidecars(None, set(), None, mirror)   # none of this directory yet
        except OSError as exc:
            return _Sidecars(None, set(), f"store directory {mirror}: {exc.strerror}",
                             mirror)
        try:
            names = set(os.listdir(mirror_fd))
        except OSError as exc:
            os.close(mirror_fd)
            return _Sidecars(None, set(), f"store directory {mirror}: {exc.strerror}",
                             mirror)
        sidecars = _Sidecars(mirror_fd, names, None, mirror, own_fd=True)
        sidecars.find_orphans(listing.names, recorded)
        return sidecars

    def single(self, root, covered):
        """A root that is not a directory: that one entry, reached from its directory."""
        key = os.path.abspath(root)
        directory, name = os.path.split(key)
        try:
            fd = store.open_directory(directory)
        except OSError as exc:
            yield findings.failed(root, key, self.recorded(key), exc.strerror)
            return
        try:
            here = os.fstat(fd)
            st = os.lstat(name, dir_fd=fd)
            was = self.recorded(key)
            recorded = {name: was} if was is not None else {}
            listing = _Listing([name, name + store.SUFFIX], fd)
            if self.is_own_sidecar(name, fd):   # `integrity-client dir/*` names them too
                yield from self.single_sidecar(root, directory, name, here, fd)
                return
            sidecars = self.sidecars_of(directory, fd, listing, recorded)
            context = _Context(os.path.dirname(root), directory, (here.st_dev, here.st_ino),
                               "", covered, recorded, sidecars,
                               _joiner(os.path.dirname(root)), _joiner(directory))
            try:
                yield from self.judge(name, root, st, listing, context, fd)
            finally:
                sidecars.close()
        except OSError as exc:
            yield findings.failed(root, key, self.recorded(key), exc.strerror)
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
        key = os.path.join(directory, stem)
        yield findings.missing(root[:-len(store.SUFFIX)], key, None, self.update,
                               expected=store.read_baseline(name, stem, dir_fd=fd),
                               sidecar=key + store.SUFFIX, dir=(here.st_dev, here.st_ino))

    def excluded(self, path, prefix):
        """Does a pattern match the name, or the path below the root (`prefix`)?
        An absolute pattern matches the absolute path."""
        if self.absolute_excludes and any(
                fnmatch.fnmatchcase(os.path.abspath(path), pat)
                for pat in self.absolute_excludes):
            return True
        if not self.excludes:
            return False
        name, relative = os.path.basename(path), path[len(prefix):]
        return any(fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(relative, pat)
                   for pat in self.excludes)


class _Context(NamedTuple):
    """One directory being listed, as judge() and its helpers need it."""
    directory: str
    absdir: str
    identity: tuple
    prefix: str
    covered: bool
    recorded: dict          # name (str, as listed) -> the catalog's Record
    sidecars: object
    below: str              # directory + "/": a name's path is below + name
    abs_below: str          # absdir + "/": a name's key


class _Listing:
    """The names of one directory, and their lstat() through its fd."""

    def __init__(self, names, fd):
        self.names = set(names)
        self.fd = fd
        self.vanished = set()       # names gone between the listing and their lstat
        self._errors = {}

    def stat(self, name):
        try:
            return os.lstat(name, dir_fd=self.fd)
        except FileNotFoundError:
            self.vanished.add(name)
            return None
        except OSError as exc:
            self._errors[name] = exc.strerror
            return None

    def error(self, name):
        return self._errors.get(name, "cannot stat")


class _Sidecars:
    """One directory's sidecars: an fd of where they are, and which names are ours.

    Beside the files, `X.md5` is X's sidecar when the catalog knows X (then
    whatever it holds, a change of it is an alteration), or when it is one
    md5sum line naming X.  Any other `X.md5` is a file in its own right, and
    X then has no sidecar (`taken`).  A sidecar of ours whose file is gone
    and unknown to the catalog is an orphan: known only by its sidecar.
    """

    def __init__(self, fd, names, error, where, own_fd=False):
        self.fd, self.names, self.error, self.where = fd, names, error, where
        self._own = own_fd
        self.skip = set()           # listed names that are our sidecars, not entries
        self.taken = set()          # files whose sidecar name holds a file of its own
        self.orphans = {}           # stem -> the hash its lone sidecar holds
        self.notes = {}             # stem -> why its *.md5 neighbour is no sidecar
        self._held = {}             # stem -> what its sidecar holds, read once

    def sort_out(self, names, recorded):
        """Beside the files: tell our sidecars from files called *.md5."""
        for name in names:
            if not name.endswith(store.SUFFIX):
                continue
            stem = name[:-len(store.SUFFIX)]
            if name in recorded:                # a file of its own, as first seen
                if stem in names:
                    self.taken.add(stem)
                continue
            was = recorded.get(stem)
            if stem in names and was is not None and was.kind == catalog_mod.FILE:
                # Its file's sidecar, read and judged with it.  A directory or
                # anything else in its place is found when it is read, and is
                # then an entry of its own too (X sorts before X.md5).
                self.skip.add(name)
                continue
            try:
                md5 = store.read_baseline(name, stem, dir_fd=self.fd)
            except store.SidecarError:
                md5 = None
            if md5 is None:
                if stem in names:
                    self.taken.add(stem)
                    if was is None:
                        self.notes[stem] = (f"{name} beside it is not its sidecar: checked "
                                            "as a file of its own")
            elif stem in names:
                self.skip.add(name)
                self._held[stem] = md5
            elif was is None:
                self.skip.add(name)
                self.orphans[stem] = md5
            else:
                self.skip.add(name)          # its file is gone: MISSING by the catalog

    def find_orphans(self, names, recorded):
        """With --store: sidecars in the mirror whose file is gone and unrecorded."""
        for name in self.names:
            stem = name[:-len(store.SUFFIX)]
            if not name.endswith(store.SUFFIX) or stem in names or stem in recorded:
                continue
            try:
                md5 = self.read(stem)
            except store.SidecarError:
                md5 = None
            if md5 is not None:
                self.orphans[stem] = md5

    def unless_regular(self, sidecar):
        """A sidecar's place holds something else (a directory, a link): list it."""
        if sidecar in self.skip and not _is_regular(sidecar, self.fd):
            self.skip.discard(sidecar)

    def read(self, name):
        """The hash recorded for `name`, None when it has no sidecar."""
        if name in self._held:
            return self._held[name]
        sidecar = name + store.SUFFIX
        if sidecar not in self.names:
            return None
        return store.read_baseline(sidecar, name, dir_fd=self.fd)

    def close(self):
        if self._own and self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _joiner(directory):
    """What os.path.join(directory, name) puts before a name (no "/" in it)."""
    return directory if not directory or directory.endswith("/") else directory + "/"


def _is_regular(name, fd):
    try:
        return stat.S_ISREG(os.lstat(name, dir_fd=fd).st_mode)
    except OSError:
        return False


def _looks_like_temp(st):
    """A temp sidecar of ours: a small plain file. Anything else named like one
    (a setuid binary, a directory) is an entry like any other."""
    # Two links: caught between the link(2) to its sidecar name and its unlink.
    return (stat.S_ISREG(st.st_mode) and st.st_size <= store.MAX_SIDECAR
            and not st.st_mode & 0o7111 and st.st_nlink <= 2)


def _identity(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _record(key, st, target=None):
    return catalog_mod.record_from_stat(key, st, target)


def _readlink(name, fd):
    try:
        return os.readlink(os.fsencode(name), dir_fd=fd)
    except OSError:
        return None

