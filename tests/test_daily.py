"""Daily use, as a sysadmin meets it (issue 12, the client's side): pipes that
close early, odd PATHs, sidecars other tools wrote, usage mistakes."""

import json
import os
import subprocess
import sys

import pytest

from helpers import CLIENT, make_tree, run_client, sidecars_under

pytestmark = pytest.mark.timeout(90)


def test_a_reader_that_leaves_early_costs_no_traceback_and_no_record(server, tmp_path):
    tree = tmp_path / "tree"
    make_tree(tree, files=300, dirs=10)
    proc = subprocess.Popen([sys.executable, CLIENT, "--fifo", server.fifo, "--json", tree],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()                     # `| head -1`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(60) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err
    assert run_client(server, tree).status == 0, "the run was recorded all the same"


def test_a_path_too_long_says_so(server, tmp_path):
    result = run_client(server, tmp_path / ("x" * 300))
    assert result.status == 2 and "file name too long" in result.stderr


def test_names_that_differ_only_by_escaping_print_differently(server, tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a\nb").write_text("newline")
    (tree / "a\\nb").write_text("backslash n")
    assert run_client(server, tree).status == 0
    (tree / "a\nb").write_text("newline, altered")
    (tree / "a\\nb").write_text("backslash n, altered")
    lines = [line.split()[1] for line in run_client(server, tree).stdout.splitlines()[:-1]]
    assert len(set(lines)) == 2, lines


def test_sidecars_md5sum_accepts_are_read_crlf_and_bsd_tags(server, tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("tagged", "crlf"):
        (tree / name).write_text(name)
    tag = subprocess.run(["md5sum", "--tag", "tagged"], cwd=tree, capture_output=True)
    (tree / "tagged.md5").write_bytes(tag.stdout)
    plain = subprocess.run(["md5sum", "crlf"], cwd=tree, capture_output=True)
    (tree / "crlf.md5").write_bytes(plain.stdout.replace(b"\n", b"\r\n"))
    assert subprocess.run(["md5sum", "--quiet", "-c", "tagged.md5", "crlf.md5"],
                          cwd=tree).returncode == 0
    records, summary = run_client(server, "--json", tree).records()
    assert summary == {"OK": 2}, records        # taken as the baselines they are


def test_status_takes_no_path_and_version_names_the_program(server, tmp_path):
    result = run_client(server, "--status", tmp_path)
    assert result.status == 2 and "takes no PATH" in result.stderr
    version = subprocess.run([sys.executable, CLIENT, "--version"], capture_output=True,
                             text=True)
    assert version.stdout.startswith("integrity-client 0.")


def test_an_absolute_exclude_matches_the_absolute_path(server, tmp_path):
    tree = tmp_path / "tree"
    make_tree(tree, files=10, dirs=2)
    records, _ = run_client(server, "--json", "--exclude", str(tree / "d1"),
                            tree).records()
    assert records and not any("/d1/" in path for path in records)


def test_the_json_summary_counts_entries_and_files(server, tmp_path):
    tree = tmp_path / "tree"
    make_tree(tree, files=10, dirs=2)
    last = json.loads(run_client(server, "--json", tree).stdout.splitlines()[-1])
    assert last["entries"] == 10 + 2 + 1 and last["files"] == 10


def test_sidecars_named_as_paths_or_a_store_inside_never_get_sidecars(server, tmp_path):
    tree = tmp_path / "tree"
    files = make_tree(tree, files=6, dirs=1)
    assert run_client(server, tree).status == 0
    everything = sorted(str(p) for p in (tree / "d0").iterdir())    # `dir/*`
    for _ in range(2):
        assert run_client(server, *everything).status == 0
    assert not [p for p in sidecars_under(tree) if p.endswith(".md5.md5")]
    assert len(sidecars_under(tree)) == len(files) == 6, "one sidecar a file, no more"
    other = tmp_path / "other"
    make_tree(other, files=6, dirs=1)
    inside = other / "store"
    inside.mkdir()
    for _ in range(2):
        assert run_client(server, "--store", inside, other).status == 0
    mirrored = sidecars_under(inside)
    assert len(mirrored) == 6 and not [p for p in mirrored if p.endswith(".md5.md5")]


def test_a_wide_directory_costs_its_names_not_its_entries(tmp_path):
    """100,000 files in one directory once took 139 MiB; its names take a few."""
    import tracemalloc

    from osproject.client.lister import Lister
    wide = tmp_path / "wide"
    wide.mkdir()
    for i in range(20_000):
        os.close(os.open(wide / f"f{i:06}", os.O_CREAT | os.O_WRONLY, 0o644))
    tracemalloc.start()
    try:
        listed = sum(1 for _ in Lister().walk(str(wide)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert listed == 20_001
    # Measured: 6.8 MB of names, their set and sorting; DirEntry objects with
    # their stat took 20.3 MB.
    assert peak < 10 * 2**20, f"{peak} bytes at the peak"
