"""The catalog: comparison rules, bytes paths, refusals, staging, kills, sharing.

Fast unit tests on real SQLite files in tmp_path.  Tests about another
owner run as root: they chown to NOBODY, or drop to it in a forked child.
"""

import os
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import pytest

from osproject.client import catalog
from osproject.client.catalog import (
    ALTERATIONS,
    BLOCKDEV,
    CHARDEV,
    DIR,
    FIFO,
    FILE,
    SOCKET,
    SYMLINK,
    Catalog,
    CatalogError,
    Change,
    Record,
)

NOBODY = 65534
MD5_A, MD5_B = "0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210"
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown or drop to another uid")


def rec(path=b"/t/f", kind=FILE, **changed):
    fields = dict(path=path, kind=kind, mode=0o755, uid=0, gid=0, size=10, ino=7, nlink=1,
                  mtime_ns=1_000, ctime_ns=2_000, rdev=0, target=None,
                  md5=MD5_A if kind == FILE else None)
    fields.update(changed)
    return Record(**fields)


def attributes(changes):
    return [change.attribute for change in changes]


def open_new(tmp_path, name="state/catalog.sqlite", roots=()):
    return Catalog.open(str(tmp_path / name), list(roots))


def entries(n, top=b"/t", kind=FILE):
    return [rec(b"%s/d%d/f%d" % (top, i % 10, i), kind) for i in range(n)]


def raw(path):
    """A plain connection, for looking behind the Catalog's back."""
    return sqlite3.connect(path, isolation_level=None)


def in_child(work, uid=None):
    """Run work() in a forked child (as `uid` if given); return what it returned, as str."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            if uid is not None:
                os.setgid(uid)
                os.setgroups([])
                os.setuid(uid)
            answer = "ok:" + str(work())
        except BaseException:  # noqa: BLE001 - the parent reads what went wrong
            answer = "failed:" + traceback.format_exc()
        os.write(write_end, answer.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        answer = f.read().decode()
    os.waitpid(pid, 0)
    assert answer.startswith("ok:"), answer
    return answer[3:]


@pytest.fixture
def nobody_dir():
    """A directory NOBODY owns and can reach (tmp_path's parents are root's 0700)."""
    directory = tempfile.mkdtemp(prefix="osp-catalog-")
    os.chown(directory, NOBODY, NOBODY)
    yield directory
    os.chmod(directory, 0o700)
    shutil.rmtree(directory)


# -- where it lives --------------------------------------------------------

def test_default_path_prefers_the_variable_then_xdg_then_home():
    assert catalog.default_path({"INTEGRITY_CATALOG": "/c/x.db", "XDG_STATE_HOME": "/s"}) \
        == "/c/x.db"
    assert catalog.default_path({"XDG_STATE_HOME": "/s", "HOME": "/h"}) \
        == "/s/osproject/catalog.sqlite"
    assert catalog.default_path({"HOME": "/h"}) == "/h/.local/state/osproject/catalog.sqlite"
    assert catalog.default_path({"XDG_STATE_HOME": "relative", "HOME": "/h"}) \
        == "/h/.local/state/osproject/catalog.sqlite", "XDG says: ignore a relative value"


# -- records ---------------------------------------------------------------

def test_record_from_stat_knows_every_kind(tmp_path):
    (tmp_path / "f").write_bytes(b"12345")
    os.chmod(tmp_path / "f", 0o4755)
    (tmp_path / "d").mkdir()
    os.symlink("/etc/passwd", tmp_path / "l")
    os.mkfifo(tmp_path / "p")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "s"))
    try:
        made = {name: catalog.record_from_stat(os.fsencode(tmp_path / name),
                                               os.lstat(tmp_path / name),
                                               target=b"/etc/passwd", md5=MD5_A)
                for name in "fdlps"}
    finally:
        sock.close()
    null = catalog.record_from_stat(b"/dev/null", os.lstat("/dev/null"), md5=MD5_A)
    assert {name: r.kind for name, r in made.items()} == {
        "f": FILE, "d": DIR, "l": SYMLINK, "p": FIFO, "s": SOCKET}
    assert made["f"].mode == 0o4755 and made["f"].size == 5 and made["f"].md5 == MD5_A
    assert made["l"].target == b"/etc/passwd" and made["l"].md5 is None
    assert made["d"].target is None and made["d"].md5 is None
    assert null.kind == CHARDEV and null.rdev == os.makedev(1, 3) and null.md5 is None
    assert made["f"].rdev == 0 and isinstance(made["f"].path, bytes)


# -- the comparison rules --------------------------------------------------

ALONE = {
    "file -> symlink": (rec(), rec(kind=SYMLINK, target=b"/etc/passwd", md5=None), ["type"]),
    "file -> fifo": (rec(), rec(kind=FIFO, md5=None), ["type"]),
    "file -> dir": (rec(), rec(kind=DIR, md5=None), ["type"]),
    "setuid": (rec(), rec(mode=0o4755), ["mode"]),
    "sticky": (rec(kind=DIR, mode=0o777), rec(kind=DIR, mode=0o1777), ["mode"]),
    "chmod": (rec(), rec(mode=0o777), ["mode"]),
    "chown": (rec(), rec(uid=NOBODY), ["owner"]),
    "chgrp": (rec(), rec(gid=NOBODY), ["group"]),
    "retarget": (rec(kind=SYMLINK, target=b"/a"), rec(kind=SYMLINK, target=b"/b"),
                 ["target"]),
    "device": (rec(kind=CHARDEV, rdev=os.makedev(1, 3)),
               rec(kind=CHARDEV, rdev=os.makedev(1, 5)), ["device"]),
    "content": (rec(), rec(md5=MD5_B), ["content"]),
}
NOT_ALONE = {
    "touch": (rec(), rec(mtime_ns=5_000, ctime_ns=6_000), ["mtime", "ctime"]),
    "restore from backup": (rec(), rec(ino=99, ctime_ns=6_000), ["ctime", "inode"]),
    "hard link added": (rec(), rec(nlink=2, ctime_ns=6_000), ["ctime", "links"]),
    "size alone": (rec(), rec(size=11), ["size"]),
    "directory grew": (rec(kind=DIR), rec(kind=DIR, size=8192, nlink=3, mtime_ns=9),
                       ["mtime", "links"]),
    "content not known on one side": (rec(), rec(md5=None), []),
}


@pytest.mark.parametrize("was, now, expected", ALONE.values(), ids=list(ALONE))
def test_each_alteration_alone_is_an_alteration(was, now, expected):
    changes = catalog.compare(was, now)
    assert attributes(changes) == expected
    assert catalog.is_alteration(changes)


@pytest.mark.parametrize("was, now, expected", NOT_ALONE.values(), ids=list(NOT_ALONE))
def test_noted_attributes_alone_are_not_alterations(was, now, expected):
    changes = catalog.compare(was, now)
    assert attributes(changes) == expected, "a directory's size is never compared"
    assert not catalog.is_alteration(changes)


def test_same_record_has_no_changes():
    assert catalog.compare(rec(), rec()) == []
    assert catalog.describe([], rec(), rec()) == ""


def test_a_type_change_keeps_owner_but_not_what_follows_from_the_type():
    was = rec(size=10, md5=MD5_A)
    now = rec(kind=SYMLINK, target=b"/etc/passwd", size=11, md5=None, mode=0o777,
              uid=NOBODY, ino=8)
    # A symlink's own mode means nothing (0777 on Linux): not a change either.
    assert attributes(catalog.compare(was, now)) == ["type", "owner", "inode"]
    assert attributes(catalog.compare(was, rec(kind="fifo", mode=0o600, md5=None))) == [
        "type", "mode"]


def test_changes_carry_old_and_new_values():
    assert catalog.compare(rec(), rec(mode=0o4755, md5=MD5_B)) == [
        Change("mode", 0o755, 0o4755), Change("content", MD5_A, MD5_B)]


def test_sidecar_is_an_alteration_the_client_adds():
    assert "sidecar" in ALTERATIONS
    assert catalog.is_alteration([Change("sidecar", MD5_A, MD5_B)])


DESCRIBED = [
    (rec(), rec(mode=0o4755), "mode 0755 -> 4755"),
    (rec(), rec(kind=SYMLINK, target=b"/etc/passwd", md5=None),
     "regular file -> symbolic link to /etc/passwd"),
    (rec(), rec(kind=FIFO, md5=None), "regular file -> FIFO"),
    (rec(kind=DIR), rec(kind=CHARDEV, rdev=os.makedev(1, 3)),
     "directory -> character device 1,3"),
    (rec(), rec(uid=NOBODY), "owner root -> nobody"),
    (rec(), rec(uid=54321), "owner root -> 54321"),
    (rec(), rec(gid=NOBODY), "group root -> nogroup"),
    (rec(kind=SYMLINK, target=b"/a"), rec(kind=SYMLINK, target=b"/b"), "target /a -> /b"),
    (rec(kind=SYMLINK, target=b"/a"), rec(kind=SYMLINK, target=b"/x\n\xff"),
     "target /a -> /x\\n\\xff"),
    (rec(kind=BLOCKDEV, rdev=os.makedev(8, 0)), rec(kind=BLOCKDEV, rdev=os.makedev(8, 1)),
     "device 8,0 -> 8,1"),
    (rec(), rec(md5=MD5_B), f"content {MD5_A} -> {MD5_B}"),
    (rec(), rec(mode=0o4755, uid=NOBODY, mtime_ns=9, size=99),
     "mode 0755 -> 4755; owner root -> nobody"),
    (rec(), rec(mtime_ns=9, ino=3), ""),
]


@pytest.mark.parametrize("was, now, text", DESCRIBED,
                         ids=[text or "nothing" for _, _, text in DESCRIBED])
def test_describe_says_what_changed_from_what_to_what(was, now, text):
    if "nobody" in text and catalog._user(NOBODY) != "nobody":
        pytest.skip("no user called nobody here")
    if "nogroup" in text and catalog._group(NOBODY) != "nogroup":
        pytest.skip("no group called nogroup here")
    assert catalog.describe(catalog.compare(was, now), was, now) == text


def test_describe_sidecar():
    changes = [Change("sidecar", MD5_A, MD5_B)]
    assert catalog.describe(changes, rec(), rec()) == \
        f"sidecar altered (catalog {MD5_A}, sidecar {MD5_B})"


def test_kind_names_and_json():
    assert catalog.kind_name(rec(kind=SOCKET)) == "socket"
    assert catalog.kind_name(rec(kind=SYMLINK, target=b"t")) == "symbolic link to t"
    assert catalog.as_json(rec(mode=0o4755)) == {
        "kind": "file", "mode": "4755", "uid": 0, "gid": 0, "size": 10, "inode": 7,
        "links": 1, "mtime_ns": 1000, "ctime_ns": 2000, "device": None, "target": None,
        "md5": MD5_A}
    link = catalog.as_json(rec(kind=SYMLINK, target=b"caf\xe9", md5=None))
    assert link["target"] == os.fsdecode(b"caf\xe9") and link["md5"] is None
    assert catalog.as_json(rec(kind=CHARDEV, rdev=os.makedev(1, 3)))["device"] == "1,3"


# -- bytes paths and the queries -------------------------------------------

ODD = [b"plain", b"caf\xe9-latin1", b"\xff\xfe", b"new\nline", b"back\\slash", b"sp ace"]


def test_odd_names_round_trip_through_every_query(tmp_path):
    cat = open_new(tmp_path)
    top = b"/t/\xc3\x28dir\n"
    records = [rec(top + b"/" + name, md5=MD5_A) for name in ODD]
    records.append(rec(top, DIR))
    records.append(rec(b"/t/\xc3\x28dir\n/x\n/link", SYMLINK, target=b"\xff\n/target"))
    for record in records:
        cat.stage(record)
    assert cat.get(records[0].path) is None, "staged rows are not visible before commit"
    assert cat.commit_run([b"/t"]) == len(records)
    assert cat.children(top) == {name: records[i] for i, name in enumerate(ODD)}
    assert cat.get(records[-1].path) == records[-1]
    assert cat.get(top) == records[-2]
    assert list(cat.subtree(top)) == sorted(records[:-2] + records[-1:])
    cat.close()
    again = open_new(tmp_path)
    assert again.get(b"/t/\xc3\x28dir\n/x\n/link").target == b"\xff\n/target"
    again.close()


def test_subtree_is_strictly_below_and_not_a_name_prefix(tmp_path):
    cat = open_new(tmp_path)
    paths = [b"/a", b"/a/b", b"/a/b/c", b"/a/b/c/d", b"/a/b-c", b"/a/b-c/x", b"/a/b0",
             b"/a/b.", b"/a/ba", b"/a/b/\xff", b"/a/c"]
    for path in paths:
        cat.stage(rec(path, DIR))
    cat.commit_run([b"/a"])
    assert [r.path for r in cat.subtree(b"/a/b")] == [b"/a/b/c", b"/a/b/c/d", b"/a/b/\xff"]
    assert [r.path for r in cat.subtree(b"/a/b/")] == [b"/a/b/c", b"/a/b/c/d", b"/a/b/\xff"]
    assert sorted(cat.children(b"/a/b")) == sorted(cat.children(b"/a/b/")) == [b"c", b"\xff"]
    assert len(list(cat.subtree(b"/"))) == len(paths)
    assert sorted(cat.children(b"/")) == [b"a"]
    assert list(cat.subtree(b"/a/b/c/d")) == []
    cat.close()


def test_subtree_streams_page_by_page(tmp_path, monkeypatch):
    monkeypatch.setattr(catalog, "PAGE_ROWS", 7)
    cat = open_new(tmp_path)
    for record in entries(100):
        cat.stage(record)
    cat.commit_run([b"/t"])
    walked = cat.subtree(b"/t")
    first = next(walked)
    assert cat.get(first.path) == first, "other calls work while a subtree is walked"
    assert [first] + list(walked) == sorted(entries(100))
    cat.close()


def test_staged_actions_apply_in_the_order_staged(tmp_path):
    cat = open_new(tmp_path)
    for path in (b"/t", b"/t/old", b"/t/old/a", b"/t/old/b", b"/t/keep", b"/t/gone"):
        cat.stage(rec(path, DIR))
    cat.commit_run([b"/t"])
    cat.stage(rec(b"/t/old/a", md5=MD5_B))       # ... then its whole directory is deleted
    cat.stage_delete(b"/t/old", subtree=True)
    cat.stage(rec(b"/t/old"))                    # a file where the directory was
    cat.stage_delete(b"/t/gone")
    cat.stage(rec(b"/t/keep", md5=MD5_B))
    cat.stage(rec(b"/t/keep", md5=MD5_A))        # the later one wins
    assert cat.commit_run([b"/t"]) == 1 + 3 + 1 + 1 + 2
    assert [r.path for r in cat.subtree(b"/t")] == [b"/t/keep", b"/t/old"]
    assert cat.get(b"/t/old").kind == FILE and cat.get(b"/t/keep").md5 == MD5_A
    cat.close()


def test_knows_a_root_only_after_a_completed_run_and_below_it(tmp_path):
    cat = open_new(tmp_path)
    cat.stage(rec(b"/srv/www/f"))
    assert not cat.knows_root(b"/srv")
    cat.abandon_run()
    assert cat.commit_run([b"/srv"]) == 0 and cat.count() == 0, "abandoned rows never apply"
    assert cat.knows_root(b"/srv") and cat.knows_root(b"/srv/www")
    assert not cat.knows_root(b"/srv-old") and not cat.knows_root(b"/")
    cat.close()


def test_a_clean_verify_writes_nothing(tmp_path):
    cat = open_new(tmp_path)
    for record in entries(50):
        cat.stage(record)
    cat.commit_run([b"/t"])
    changes = cat._con.total_changes
    for d in range(10):
        cat.children(b"/t/d%d" % d)
    assert cat.commit_run([b"/t"]) == 0
    assert cat._con.total_changes == changes
    cat.close()


def test_paths_must_be_absolute_and_normalised(tmp_path):
    cat = open_new(tmp_path)
    for bad in (b"relative", b"/trailing/", b"/nul\0"):
        with pytest.raises(ValueError):
            cat.stage(rec(bad))
    cat.close()


# -- creation ---------------------------------------------------------------

def test_created_0600_in_a_0700_directory_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        cat = open_new(tmp_path, "a/b/state/catalog.sqlite")
        for record in entries(10):
            cat.stage(record)
        cat.commit_run([b"/t"])
        directory = tmp_path / "a/b/state"
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        names = sorted(os.listdir(directory))
        assert names[0] == "catalog.sqlite" and set(names) <= {
            "catalog.sqlite", "catalog.sqlite-wal", "catalog.sqlite-shm"}
        for name in names:
            assert stat.S_IMODE(os.stat(directory / name).st_mode) == 0o600, name
        assert cat._con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        cat.close()
    finally:
        os.umask(old)
    assert os.listdir(tmp_path / "a/b/state") == ["catalog.sqlite"]


def test_a_failed_creation_leaves_no_catalog_and_no_temp(tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(catalog.os, "link", no_space)
    with pytest.raises(CatalogError, match="No space left"):
        open_new(tmp_path)
    assert os.listdir(tmp_path / "state") == []


# -- refusals ----------------------------------------------------------------

def real_catalog(path, n=3000):
    """A committed catalog of n entries at `path`, closed; its bytes."""
    cat = Catalog.open(path, [])
    for record in entries(n):
        cat.stage(record)
    cat.commit_run([b"/t"])
    cat.close()
    with open(path, "rb") as f:
        return f.read()


def assert_refused(path, match, roots=()):
    """Opening fails with CatalogError and leaves the file and its directory as they were."""
    directory = os.path.dirname(path)

    def listing():
        return sorted(os.listdir(directory)) if os.path.isdir(directory) else None

    before = listing()
    content = open(path, "rb").read() if os.path.isfile(path) else None
    with pytest.raises(CatalogError, match=match) as refusal:
        Catalog.open(path, list(roots))
    assert listing() == before
    if content is not None:
        assert open(path, "rb").read() == content, "a refused catalog was modified"
    return str(refusal.value)


def test_refuses_a_symlink_even_to_a_good_catalog(tmp_path):
    good = str(tmp_path / "good.sqlite")
    real_catalog(good, 10)
    os.symlink(good, tmp_path / "link.sqlite")
    message = assert_refused(str(tmp_path / "link.sqlite"), "is a symlink")
    assert "link.sqlite" in message
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling.sqlite")
    assert_refused(str(tmp_path / "dangling.sqlite"), "is a symlink")
    assert not os.path.exists(tmp_path / "nowhere"), "a dangling link was followed"


def test_refuses_what_is_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "fifo.sqlite")
    assert_refused(str(tmp_path / "fifo.sqlite"), "not a regular file")
    (tmp_path / "dir.sqlite").mkdir()
    assert_refused(str(tmp_path / "dir.sqlite"), "not a regular file")


@as_root
def test_refuses_another_owners_catalog(tmp_path):
    path = str(tmp_path / "catalog.sqlite")
    real_catalog(path, 10)
    os.chown(path, NOBODY, NOBODY)
    assert_refused(path, f"belongs to uid {NOBODY}")


@as_root
def test_refuses_a_directory_another_user_owns(tmp_path):
    (tmp_path / "theirs").mkdir(mode=0o700)
    path = str(tmp_path / "theirs" / "catalog.sqlite")
    real_catalog(path, 10)
    os.chown(tmp_path / "theirs", NOBODY, NOBODY)
    assert_refused(path, "directory .* belongs to uid")


@pytest.mark.parametrize("mode", [0o770, 0o702, 0o1777])
def test_refuses_a_directory_others_may_write(tmp_path, mode):
    (tmp_path / "shared").mkdir()
    path = str(tmp_path / "shared" / "catalog.sqlite")
    real_catalog(path, 10)
    os.chmod(tmp_path / "shared", mode)
    assert_refused(path, "writable by group or others")
    os.unlink(path)
    assert_refused(path + ".new", "writable by group or others")
    assert not os.path.exists(path + ".new"), "a catalog was created in an unsafe directory"


def test_refuses_a_catalog_others_may_write(tmp_path):
    path = str(tmp_path / "catalog.sqlite")
    real_catalog(path, 10)
    os.chmod(path, 0o620)
    assert_refused(path, "writable by group or others")


def test_refuses_a_catalog_inside_a_checked_tree(tmp_path):
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    os.symlink(tree, tmp_path / "link")
    inside = str(tree / "sub" / "catalog.sqlite")
    assert_refused(inside, "inside the checked tree", [str(tree)])
    assert not os.path.exists(inside), "refused, yet created"
    assert_refused(inside, "inside the checked tree", [str(tmp_path / "link")])
    assert_refused(inside, "inside the checked tree", [os.fsencode(tree / "sub")])
    assert_refused(str(tmp_path / "link" / "sub" / "c.sqlite"), "inside", [str(tree)])
    assert_refused(str(tree / "new" / "deeper" / "c.sqlite"), "inside", [str(tree)])
    assert not os.path.exists(tree / "new"), "a directory was made inside the tree"
    real_catalog(str(tmp_path / "c.sqlite"), 10)
    assert_refused(str(tmp_path / "c.sqlite"), "inside", [str(tmp_path / "c.sqlite")])
    # A neighbour whose name merely starts like the tree is outside it.
    Catalog.open(str(tmp_path / "tree-state" / "c.sqlite"), [str(tree)]).close()


@pytest.mark.processes
def test_refuses_a_catalog_reached_through_a_bind_mount_of_the_tree(tmp_path):
    """The tree mounted again under the state directory: no path says so, the inode does."""
    tree, mirror = tmp_path / "tree", tmp_path / "state"
    tree.mkdir()
    mirror.mkdir()
    probe = ("import sys; from osproject.client.catalog import Catalog, CatalogError\n"
             "try: Catalog.open(sys.argv[1], [sys.argv[2]])\n"
             "except CatalogError as e: print(e)\n")
    script = 'mount --bind "$1" "$2" && exec "$3" -c "$4" "$2/c.sqlite" "$1"'
    try:
        done = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", str(tree),
                               str(mirror), sys.executable, probe],
                              capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        pytest.skip("no unshare(1)")
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount in a private namespace: {done.stderr.strip()}")
    assert "inside the checked tree" in done.stdout, done.stdout + done.stderr
    assert os.listdir(tree) == []


def test_refuses_an_empty_file(tmp_path):
    path = tmp_path / "catalog.sqlite"
    path.touch(mode=0o600)
    assert_refused(str(path), "damaged: it is empty")


@pytest.mark.parametrize("cut", ["half", "page", "one page", "header"])
def test_refuses_a_truncated_catalog(tmp_path, cut):
    path = str(tmp_path / "catalog.sqlite")
    data = real_catalog(path)
    size = {"half": len(data) // 2, "page": len(data) // 2 // 4096 * 4096,
            "one page": 4096, "header": 50}[cut]
    with open(path, "r+b") as f:
        f.truncate(size)
    assert_refused(path, "damaged")


def test_refuses_random_bytes(tmp_path):
    path = tmp_path / "catalog.sqlite"
    path.write_bytes(os.urandom(8192))
    os.chmod(path, 0o600)
    assert_refused(str(path), "damaged: it is not an SQLite database")


def test_refuses_a_catalog_with_garbage_inside(tmp_path):
    path = str(tmp_path / "catalog.sqlite")
    data = real_catalog(path)
    with open(path, "r+b") as f:
        f.seek(4096)
        f.write(os.urandom(len(data) - 8192))
    assert_refused(path, "damaged")


def test_refuses_an_sqlite_database_that_is_not_ours(tmp_path):
    path = str(tmp_path / "other.sqlite")
    con = raw(path)
    con.executescript("CREATE TABLE t (a); INSERT INTO t VALUES (1);")
    con.close()
    os.chmod(path, 0o600)
    assert_refused(path, "not an osproject catalog")


def test_refuses_a_schema_it_does_not_know(tmp_path):
    path = str(tmp_path / "catalog.sqlite")
    real_catalog(path, 10)
    con = raw(path)
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    con.close()
    assert_refused(path, "schema version 99")
    con = raw(path)
    con.execute("DELETE FROM meta")
    con.close()
    assert_refused(path, "no schema version")


# -- kill safety ----------------------------------------------------------------

def run_rows(path):
    con = raw(path)
    try:
        return (con.execute("SELECT count(*) FROM runs").fetchone()[0],
                con.execute("SELECT count(*) FROM staged").fetchone()[0])
    finally:
        con.close()


def test_a_killed_run_changes_nothing_and_its_rows_are_cleaned(tmp_path):
    path = str(tmp_path / "catalog.sqlite")
    cat = Catalog.open(path, [])
    cat.stage(rec(b"/t/f", md5=MD5_A))
    cat.commit_run([b"/t"])
    cat.close()

    def killed_run():
        dying = Catalog.open(path, [])
        dying.stage(rec(b"/t/f", md5=MD5_B))      # the run "accepts" a change ...
        dying.stage_delete(b"/t/f")
        for record in entries(5000, top=b"/u"):
            dying.stage(record)
        os._exit(0)                               # ... and dies before commit_run
    pid = os.fork()
    if pid == 0:
        try:
            killed_run()
        finally:
            os._exit(1)
    assert os.waitpid(pid, 0)[1] == 0
    runs, staged = run_rows(path)
    assert runs == 1 and staged >= 4000, "the child did write staging rows"

    cat = Catalog.open(path, [])
    assert cat.get(b"/t/f").md5 == MD5_A, "the killed run's change took effect"
    assert cat.count() == 1 and not cat.knows_root(b"/u")
    assert run_rows(path) == (0, 0), "a dead run's staging rows were kept"
    cat.close()


def test_sigkill_at_any_moment_leaves_all_or_nothing(tmp_path):
    path = str(tmp_path / "catalog.sqlite")
    Catalog.open(path, []).close()
    for delay in (0.05, 0.2, 0.4):
        pid = os.fork()
        if pid == 0:
            try:
                cat = Catalog.open(path, [])
                for record in entries(20000, top=b"/k"):
                    cat.stage(record)
                cat.commit_run([b"/k"])
            finally:
                os._exit(0)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        cat = Catalog.open(path, [])
        assert (cat.count(), cat.knows_root(b"/k")) in ((0, False), (20000, True))
        if cat.count():
            break
        cat.close()
    cat.close()


def test_stale_runs_are_cleaned_but_live_ones_kept(tmp_path):
    path = str(tmp_path / "catalog.sqlite")
    Catalog.open(path, []).close()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)                        # a pid that is surely gone
    now, day = time.time_ns(), catalog.STALE_AFTER_NS
    host = socket.gethostname()
    runs = {1: (os.getpid(), host, now),      # alive: kept
            2: (pid, host, now),              # dead: cleaned
            3: (os.getpid(), host, now - day - 1),    # silent for a day: cleaned
            4: (pid, "elsewhere", now)}       # another host's: only its age counts
    con = raw(path)
    for run, (run_pid, run_host, heard) in runs.items():
        con.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?)", (run, run_pid, run_host,
                                                                 heard, heard))
        con.execute("INSERT INTO staged (run, seq, action, path) VALUES (?, 1, 'drop', '/x')",
                    (run,))
    con.close()
    Catalog.open(path, []).close()
    con = raw(path)
    assert [row[0] for row in con.execute("SELECT id FROM runs ORDER BY id")] == [1, 4]
    assert [row[0] for row in con.execute("SELECT run FROM staged ORDER BY run")] == [1, 4]
    con.close()


def test_a_run_whose_rows_were_discarded_cannot_commit(tmp_path):
    path = str(tmp_path / "catalog.sqlite")
    cat = Catalog.open(path, [])
    for record in entries(catalog.BATCH_ROWS + 10):
        cat.stage(record)
    con = raw(path)
    con.execute("DELETE FROM staged")         # what another client's clean-up would do
    con.execute("DELETE FROM runs")
    con.close()
    with pytest.raises(CatalogError, match="discarded as stale"):
        cat.commit_run([b"/t"])
    assert cat.count() == 0 and not cat.knows_root(b"/t")
    cat.abandon_run()
    cat.stage(rec())
    assert cat.commit_run([b"/t"]) == 1, "a new run works after abandon_run"
    cat.close()


# -- sharing ----------------------------------------------------------------------

def test_two_catalogs_on_one_file_interleaved_keep_both(tmp_path):
    path = str(tmp_path / "catalog.sqlite")
    one, two = Catalog.open(path, []), Catalog.open(path, [])
    mine, theirs = entries(2500, top=b"/one"), entries(2500, top=b"/two")
    for a, b in zip(mine, theirs, strict=True):
        one.stage(a)
        two.stage(b)
    two.stage(rec(b"/one/d0/f0", md5=MD5_B))  # both record one path: the last commit wins
    assert one.commit_run([b"/one"]) == 2500
    assert two.count() == 2500 and not two.knows_root(b"/two")
    assert two.commit_run([b"/two"]) == 2501
    for cat in (one, two):
        assert cat.count() == 5000 and cat.knows_root(b"/one") and cat.knows_root(b"/two")
        assert cat.get(b"/one/d0/f0").md5 == MD5_B
    one.close()
    two.close()


def test_two_processes_at_once_both_finish_and_keep_their_records(tmp_path):
    path = str(tmp_path / "catalog.sqlite")
    Catalog.open(path, []).close()

    def client(top):
        cat = Catalog.open(path, [])
        for record in entries(6000, top=top):
            cat.stage(record)
        applied = cat.commit_run([top])
        cat.close()
        return applied
    pids = []
    for top in (b"/p1", b"/p2"):
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                status = 0 if client(top) == 6000 else 1
            finally:
                os._exit(status)
        pids.append(pid)
    assert [os.waitpid(pid, 0)[1] for pid in pids] == [0, 0]
    cat = Catalog.open(path, [])
    assert cat.count() == 12000 and cat.knows_root(b"/p1") and cat.knows_root(b"/p2")
    assert run_rows(path) == (0, 0)
    cat.close()


def test_threads_stage_through_one_catalog(tmp_path):
    cat = open_new(tmp_path)
    tops = [b"/t%d" % i for i in range(4)]
    threads = [threading.Thread(target=lambda top=top: [cat.stage(r) for r in
                                                         entries(1500, top=top)])
               for top in tops]
    readers = [threading.Thread(target=lambda: [cat.children(b"/t0/d1") for _ in range(200)])]
    for thread in threads + readers:
        thread.start()
    for thread in threads + readers:
        thread.join()
    assert cat.commit_run(tops) == 6000 and cat.count() == 6000
    cat.close()


# -- writes that fail ---------------------------------------------------------------

@as_root
@pytest.mark.parametrize("directory_mode", [0o700, 0o500])
def test_a_read_only_catalog_fails_clearly_and_records_nothing(nobody_dir, directory_mode):
    path = os.path.join(nobody_dir, "catalog.sqlite")
    in_child(lambda: real_catalog(path, 10) and None, uid=NOBODY)
    os.chmod(path, 0o400)
    os.chmod(nobody_dir, directory_mode)
    before = open(path, "rb").read()

    def use():
        try:
            cat = Catalog.open(path, [])
        except CatalogError as exc:
            return f"open: {exc}"    # WAL needs its -shm file: a 0500 directory stops us here
        assert cat.get(b"/t/d0/f0") is not None and cat.commit_run([b"/t"]) == 0
        try:
            for record in entries(catalog.BATCH_ROWS + 1, top=b"/new"):
                cat.stage(record)
            return "staged into a read-only catalog"
        except CatalogError as exc:
            first = str(exc)
        try:
            cat.commit_run([b"/new"])
            return "committed into a read-only catalog"
        except CatalogError:
            pass
        cat.close()
        return f"stage: {first}"
    said = in_child(use, uid=NOBODY)
    assert "writable by this user" in said and "catalog.sqlite" in said, said
    assert open(path, "rb").read() == before
    os.chmod(nobody_dir, 0o700)
    os.chmod(path, 0o600)

    def count_and_close():
        c = Catalog.open(path, [])
        return (c.count(), c.knows_root(b"/new"), c.close())[:2]

    assert in_child(count_and_close, uid=NOBODY) == "(10, False)"


def test_a_full_disk_fails_clearly_and_records_nothing_half(tmp_path):
    cat = open_new(tmp_path)
    for record in entries(100):
        cat.stage(record)
    cat.commit_run([b"/t"])
    pages = cat._con.execute("PRAGMA page_count").fetchone()[0]
    cat._con.execute(f"PRAGMA max_page_count = {pages + 3}")   # a disk that fills up
    with pytest.raises(CatalogError, match="disk is full"):
        for record in entries(20000, top=b"/big"):
            cat.stage(record)
    with pytest.raises(CatalogError, match="disk is full"):
        cat.commit_run([b"/big"])
    assert cat.count() == 100 and not cat.knows_root(b"/big")
    cat.abandon_run()
    cat.stage(rec(b"/big/one"))
    cat._con.execute("PRAGMA max_page_count = 1073741823")
    assert cat.commit_run([b"/big"]) == 1
    cat.close()
