"""Findings: what one entry's check amounts to, against the catalog.

Pure rules, no I/O: the lister and the checkers gather what was recorded
(`was`, a catalog Record or None), what is there now (`now`, from lstat)
and, for a regular file, the hash the server agreed; these functions say
which status that is, what changed, and what the catalog must record.
The catalog is the authority: a sidecar is only its copy for `md5sum -c`,
so a sidecar that disagrees is itself an alteration, and the content is
always judged against the catalog's hash.
"""

from typing import NamedTuple

from ..statuses import CHANGED, ERROR, MISSING, NEW, OK, UNSTABLE
from . import catalog

UNVERIFIED = (ERROR, UNSTABLE)


class Finding(NamedTuple):
    """One entry's result, as the report shows it and the catalog records it."""
    path: str                     # as the user sees it
    key: str                      # its absolute path: the catalog's key, the server's name
    status: str
    md5: str | None = None        # the agreed hash, for a regular file
    expected: str | None = None   # the hash it was checked against
    error: str | None = None      # why it could not be checked, or a note
    changes: tuple = ()           # catalog.Change of every attribute that moved
    was: object = None            # the catalog's Record, None when it had none
    now: object = None            # the Record as found (with the agreed hash)
    stage: object = None          # the Record the catalog records at the end of the run
    forget: bool = False          # the catalog forgets this entry (and all below it)
    altered: bool = False         # an alteration: the run exits 1
    repair: bool = False          # --update: rewrite the sidecar with the agreed hash
    sidecar: str | None = None    # where its sidecar is (MISSING: to remove it)
    dir: tuple | None = None      # the identity of its directory as listed
    covered: bool = True          # under a root the catalog knew before this run
    unchecked: bool = False       # one worker's word: held for corrections
    updated: bool = False         # --update accepted it
    moved_to: str | None = None   # MOVED: the new path, as the user sees it
    moved_key: str | None = None  # MOVED: the new absolute path


def of_entry(path, key, was, now, covered, update, **extra):
    """A directory, symlink or special file: judged by its attributes alone."""
    if was is None:
        return Finding(path, key, NEW, now=now, stage=now, altered=covered,
                       covered=covered, **extra)
    changes = tuple(catalog.compare(was, now))
    altered = catalog.is_alteration(changes)
    return Finding(path, key, CHANGED if altered else OK, changes=changes, was=was, now=now,
                   stage=now if update and changes else None, altered=altered,
                   updated=update and altered, **extra)


def as_recorded(entry, status, md5, unchecked=False):
    """Is a file's verdict the common case of a clean night: OK, by a checked
    reading, with the catalog's hash, which its sidecar holds too, and every
    attribute (kind through target) as recorded?  Then nothing changed,
    settled without comparing field by field."""
    was = entry.was
    return (status == OK and was is not None and md5 == was.md5 == entry.sidecar_md5
            and was[1:12] == entry.now[1:12] and not unchecked)


def of_file(entry, status, md5, error, update, unchecked=False):
    """A regular file, once the server has said what its content is.

    `status` is the server's verdict against `entry.expected`: the
    catalog's hash when it has one, else the sidecar's.
    """
    was = entry.was
    if as_recorded(entry, status, md5, unchecked):
        return Finding(entry.path, entry.key, OK, md5, entry.expected, error, was=was,
                       now=entry.now, covered=entry.covered)
    common = dict(path=entry.path, key=entry.key, expected=entry.expected,
                  sidecar=entry.sidecar, dir=entry.dir, covered=entry.covered,
                  unchecked=unchecked)
    if status in UNVERIFIED or md5 is None:
        # Known to the catalog, or by its sidecar: a hidden change looks like
        # this, a file swapped for a symlink after the listing (SKIPPED) too.
        recorded = was is not None or entry.expected is not None
        return Finding(status=status, md5=md5, error=error, was=was, now=entry.now,
                       altered=recorded, **common)
    now = entry.now._replace(md5=md5)
    if was is None:
        return _unrecorded(entry, status, now, error, update, common)
    changes = list(catalog.compare(was, now))
    if was.kind == catalog.FILE and entry.sidecar is not None \
            and (entry.sidecar_error or entry.sidecar_md5 != was.md5):
        changes.append(catalog.Change("sidecar", was.md5,
                                      entry.sidecar_error or entry.sidecar_md5))
    altered = catalog.is_alteration(changes)
    repair = (update and any(c.attribute == "sidecar" for c in changes)
              and md5 == was.md5)
    return Finding(status=CHANGED if altered else OK, md5=md5, error=error,
                   changes=tuple(changes), was=was, now=now,
                   stage=now if update and changes else None, altered=altered,
                   repair=repair, updated=update and altered, **common)


def _unrecorded(entry, status, now, error, update, common):
    """A file the catalog does not know: new, or first seen since sidecars only."""
    error = error or entry.note
    if entry.covered:           # the catalog knew this tree: an addition
        if status == CHANGED:
            error = "its sidecar, planted beside it, records another hash"
        return Finding(status=NEW, md5=now.md5, error=error, now=now, stage=now,
                       altered=True, **common)
    if status == CHANGED:       # a tree checked by its sidecars until now
        kept = now if update else now._replace(md5=entry.expected)
        return Finding(status=CHANGED, md5=now.md5, error=error, now=now, stage=kept,
                       altered=True, updated=update,
                       changes=(catalog.Change("content", entry.expected, now.md5),),
                       **common)
    return Finding(status=status, md5=now.md5, error=error, now=now, stage=now, **common)


def missing(path, key, was, update, expected=None, **extra):
    """An entry the catalog has and the listing no longer finds; with was None,
    a file known only by its lone sidecar, which holds `expected`."""
    return Finding(path, key, MISSING, expected=expected or (was.md5 if was else None),
                   was=was, forget=update, altered=True, updated=update, **extra)


def failed(path, key, was, reason, **extra):
    """An entry that could not be looked at (unlisted directory, lstat failed)."""
    return Finding(path, key, ERROR, error=reason, was=was, altered=was is not None,
                   **extra)


def corrected(finding, status, md5, error):
    """The server re-checked an unchecked hash and found the first one wrong.

    Only a hash nobody else read goes unchecked: that of a file with no
    baseline, so its status (NEW, or CHANGED for a change of type) stands
    unless no hash could be agreed at all.
    """
    if status in UNVERIFIED or md5 is None:
        return finding._replace(status=status, md5=None, error=error, stage=None,
                                altered=finding.altered or status in UNVERIFIED)
    now = finding.now._replace(md5=md5) if finding.now else None
    return finding._replace(md5=md5, error=error, now=now,
                            stage=now if finding.stage is not None else None)
