"""The whole job through real processes: server, five workers, FIFOs, client."""

import json
import os
import shutil
import socket

import pytest

from helpers import make_tree, md5sum_check, run_client, sidecars_under, tamper

pytestmark = pytest.mark.timeout(120)


def test_first_run_creates_sidecars_md5sum_accepts(server, tmp_path):
    tree = tmp_path / "tree"
    files = make_tree(tree, files=300, dirs=12)
    result = run_client(server, "--json", tree)
    assert result.status == 0, result.stderr
    records, summary = result.records()
    assert summary == {"NEW": 300}
    assert set(records) == set(map(str, files))
    assert all(len(r["md5"]) == 32 for r in records.values())
    sidecars = sidecars_under(tree)
    assert sorted(sidecars) == sorted(f + ".md5" for f in files)
    assert md5sum_check(sidecars) == []


def test_later_runs_report_ok_changed_missing_and_keep_the_baseline(server, tmp_path):
    tree = tmp_path / "tree"
    files = make_tree(tree, files=60)
    assert run_client(server, tree).status == 0
    again = run_client(server, "--json", tree)
    assert again.status == 0 and again.records()[1] == {"OK": 60}

    changed, gone = files[3], files[7]
    baseline = open(changed + ".md5", "rb").read()
    tamper(changed)
    os.unlink(gone)
    result = run_client(server, "--json", tree)
    assert result.status == 1
    records, summary = result.records()
    assert summary == {"OK": 58, "CHANGED": 1, "MISSING": 1}
    assert records[changed]["status"] == "CHANGED"
    assert records[changed]["expected"] == baseline.split()[0].decode()
    assert records[changed]["md5"] != records[changed]["expected"]
    assert records[gone]["status"] == "MISSING"
    assert open(changed + ".md5", "rb").read() == baseline, "baseline overwritten"
    assert server.events("file.changed")[0]["path"] == changed
    assert server.events("file.missing")[0]["path"] == gone


def test_human_output_lists_what_is_not_ok_and_a_summary(server, tmp_path):
    tree = tmp_path / "tree"
    files = make_tree(tree, files=10)
    run_client(server, tree)
    tamper(files[2], b"x")
    result = run_client(server, tree)
    lines = result.stdout.splitlines()
    assert result.status == 1
    assert len(lines) == 2
    assert lines[0].startswith("CHANGED") and files[2] in lines[0]
    assert lines[1] == "16 entries: 15 OK, 1 CHANGED"


def test_special_files_are_tracked_never_read(server, tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "regular").write_bytes(b"data")
    os.mkfifo(tree / "fifo")
    (tree / "zero").symlink_to("/dev/zero")
    (tree / "dangling").symlink_to(tree / "nowhere")
    (tree / "loop").symlink_to(tree / "loop")
    (tree / "up").symlink_to(tree, target_is_directory=True)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tree / "socket"))
    try:
        result = run_client(server, "--json", tree, timeout=30)
    finally:
        sock.close()
    records, summary = result.records(every_entry=True)
    assert result.status == 0
    assert summary == {"NEW": 1 + 6 + 1}           # the file, the others, the root
    assert records[str(tree / "fifo")]["kind"] == "fifo"
    assert records[str(tree / "socket")]["kind"] == "socket"
    assert records[str(tree / "zero")]["kind"] == "symlink"
    assert all("md5" not in r for p, r in records.items() if r["kind"] != "file")
    assert sorted(os.listdir(tree)) == sorted(
        ["regular", "regular.md5", "fifo", "zero", "dangling", "loop", "up", "socket"])


ODD = [b"new\nline", b"back\\slash", b"cr\rname", b"-dash", b" spaces ",
       b"caf\xe9", b"\xff\xfe\xfd", b"tab\tname", b"*star?"]


def test_odd_names_get_sidecars_md5sum_accepts(server, tmp_path):
    tree = os.fsencode(tmp_path / "odd")
    os.mkdir(tree)
    for name in ODD:
        with open(os.path.join(tree, name), "wb") as f:
            f.write(b"odd " + name)
    result = run_client(server, "--json", os.fsdecode(tree))
    records, summary = result.records()
    assert summary == {"NEW": len(ODD)}, result.stdout
    paths = {os.fsencode(p) for p in records}
    assert paths == {os.path.join(tree, n) for n in ODD}
    sidecars = sidecars_under(tree)
    assert len(sidecars) == len(ODD)
    assert md5sum_check(sidecars) == []
    assert run_client(server, os.fsdecode(tree)).status == 0


def test_a_foreign_md5_file_is_checked_not_taken_for_a_sidecar(server, tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "checksums.md5").write_text("these are my notes\n")
    (tree / "a").write_text("a")
    (tree / "b").write_text("b")
    (tree / "b.md5").write_text("not ours\n")      # b's sidecar slot, taken
    records, summary = run_client(server, "--json", tree).records()
    assert records[str(tree / "checksums.md5")]["status"] == "NEW"
    assert records[str(tree / "b.md5")]["status"] == "NEW", "a file of its own"
    assert records[str(tree / "b")]["status"] == "NEW", "checked, with no sidecar"
    assert (tree / "b.md5").read_text() == "not ours\n", "a foreign file was overwritten"
    assert run_client(server, tree).status == 0


def test_store_keeps_sidecars_out_of_the_tree(server, tmp_path):
    tree, store = tmp_path / "tree", tmp_path / "store"
    files = make_tree(tree, files=15)
    mistyped = run_client(server, "--store", store, tree)
    assert mistyped.status == 2 and "no such directory" in mistyped.stderr
    assert not store.exists(), "a mistyped store must not be made afresh"
    store.mkdir()
    assert run_client(server, "--store", store, tree).status == 0
    assert sidecars_under(tree) == []
    mirrored = sidecars_under(store)
    assert len(mirrored) == 15
    os.unlink(files[0])
    result = run_client(server, "--json", "--store", store, tree)
    assert result.status == 1
    assert result.records()[1] == {"OK": 14, "MISSING": 1}


def test_a_copy_of_a_real_directory(server, tmp_path):
    source = os.path.dirname(json.__file__)     # the stdlib: real names, real sizes
    real = os.path.dirname(source)
    tree = tmp_path / "real"
    shutil.copytree(real, tree, symlinks=True,
                    ignore=shutil.ignore_patterns("site-packages", "__pycache__", "test",
                                                  "idlelib", "tkinter", "ensurepip"))
    first = run_client(server, "--json", tree)
    records, summary = first.records()
    assert first.status == 0 and summary.get("NEW", 0) > 500, summary
    assert set(summary) <= {"NEW", "SKIPPED"}
    assert md5sum_check(sidecars_under(tree)) == []
    second = run_client(server, "--json", tree)
    assert second.status == 0
    assert second.records()[1].get("OK") == summary["NEW"]


def test_exclude_skips_matching_names(server, tmp_path):
    tree = tmp_path / "tree"
    make_tree(tree, files=10, dirs=2)
    (tree / "d0" / "cache.tmp").write_text("scratch")
    records, summary = run_client(server, "--json", "--exclude", "*.tmp", tree).records()
    assert summary == {"NEW": 10}
    assert not (tree / "d0" / "cache.tmp.md5").exists()
