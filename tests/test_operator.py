"""What an operator reaches for: progress, exclusions, accepting changes."""

import os
import subprocess
import sys
import threading

import pytest

from helpers import (
    CLIENT,
    CLIENT_TIMEOUT,
    make_tree,
    md5sum_check,
    run_client,
    sidecars_under,
    tamper,
)

pytestmark = pytest.mark.timeout(120)


class Terminal:
    """Run the client with its stderr (and maybe stdout) on a pseudo-terminal."""

    def __init__(self, server, *args, stdout_too=False):
        master, slave = os.openpty()
        self.raw = bytearray()
        reader = threading.Thread(target=self._drain, args=(master,))
        reader.start()
        try:
            self.proc = subprocess.run(
                [sys.executable, CLIENT, "--fifo", server.fifo, *map(str, args)],
                stdout=slave if stdout_too else subprocess.PIPE, stderr=slave,
                timeout=CLIENT_TIMEOUT)
        finally:
            os.close(slave)     # the reader sees EOF (EIO) once the client is gone too
            reader.join(CLIENT_TIMEOUT)
            os.close(master)
        self.text = self.raw.decode("utf-8", "replace")

    def _drain(self, master):
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:         # EIO: every slave end is closed
                return
            if not data:
                return
            self.raw += data

    def screen(self):
        """The lines a terminal shows after the carriage returns and erases."""
        lines, line, col = [], [], 0
        text = self.text.replace("\x1b[K", "\x00")     # one char for "erase to end"
        for ch in text:
            if ch == "\r":
                col = 0
            elif ch == "\n":
                lines.append("".join(line))
                line, col = [], 0
            elif ch == "\x00":
                del line[col:]
            else:
                line[col:col + 1] = [ch]
                col += 1
        return lines + (["".join(line)] if line else [])


def test_progress_is_drawn_on_a_terminal_and_erased_at_the_end(server, tmp_path):
    tree = tmp_path / "tree"
    make_tree(tree, files=40)
    term = Terminal(server, tree)
    assert term.proc.returncode == 0
    assert "listed " in term.text and " files/s " in term.text
    assert term.text.endswith("\r\x1b[K"), "the progress line was left on the screen"
    assert term.screen() == [], "the terminal shows something other than nothing"
    out = term.proc.stdout.decode()
    assert out.endswith("46 entries: 46 NEW\n") and "\x1b" not in out and "\r" not in out


def checked_then_altered(server, tree, files, changed, gone):
    """A tree with baselines, then one file changed and one deleted; its paths."""
    paths = make_tree(tree, files=files)
    run_client(server, tree)
    tamper(paths[changed], b"altered")
    os.unlink(paths[gone])
    return paths


def test_results_and_progress_never_share_a_line(server, tmp_path):
    tree = tmp_path / "tree"
    files = checked_then_altered(server, tree, files=30, changed=3, gone=7)
    term = Terminal(server, tree, stdout_too=True)
    assert term.proc.returncode == 1
    assert "listed " in term.text
    screen = term.screen()
    assert sorted(screen[:-1]) == sorted([
        f"CHANGED  {files[3]}  (content {_expected(files[3])} -> {_md5(files[3])})",
        f"MISSING  {files[7]}"]), screen
    assert screen[-1] == "36 entries: 34 OK, 1 CHANGED, 1 MISSING"


def test_no_progress_when_quiet_or_not_a_terminal(server, tmp_path):
    tree = tmp_path / "tree"
    make_tree(tree, files=20)
    quiet = Terminal(server, "--quiet", tree)
    assert quiet.proc.returncode == 0
    assert quiet.text == ""
    piped = run_client(server, tree)
    assert piped.status == 0 and piped.stderr == ""


def test_exclude_matches_the_name_or_the_path_below_the_root(server, tmp_path):
    tree = tmp_path / "tree"
    make_tree(tree, files=20, dirs=4)      # d0..d3, f0..f19, fI in d(I % 4)
    (tree / "d2" / "deep").mkdir()
    (tree / "d2" / "deep" / "inner.dat").write_text("below an excluded directory")
    (tree / "d1" / "f1.dat.bak").write_text("a backup")
    args = ["--exclude", "d0/f4.dat", "--exclude", "d2", "--exclude", "*.bak"]
    records, summary = run_client(server, "--json", *args, tree).records()
    expected = {str(tree / f"d{i % 4}" / f"f{i}.dat") for i in range(20)
                if i % 4 != 2 and i != 4}
    assert set(records) == expected
    assert summary == {"NEW": len(expected)}
    assert not (tree / "d0" / "f4.dat.md5").exists()
    assert not list((tree / "d2").rglob("*.md5"))


def test_exclude_is_relative_to_the_root_not_the_absolute_path(server, tmp_path):
    tree = tmp_path / "tree"
    make_tree(tree, files=4, dirs=1)
    # Would match the path with the root's own name in front, not the one below it.
    # (An absolute pattern is matched against the absolute path: test_daily.py.)
    pattern = f"{tree.name}/d0/*"
    records, summary = run_client(server, "--json", "--exclude", pattern, tree).records()
    assert summary == {"NEW": 4}


def test_update_accepts_changes_and_removals_and_the_next_run_is_clean(server, tmp_path):
    tree = tmp_path / "tree"
    files = checked_then_altered(server, tree, files=20, changed=0, gone=1)
    updated = run_client(server, "--update", tree)
    assert updated.status == 1, "accepting changes still reports them"
    assert f"CHANGED  {files[0]}  (content " in updated.stdout
    assert "baseline updated)" in updated.stdout
    assert f"MISSING  {files[1]}  (baseline removed)" in updated.stdout
    assert not os.path.exists(files[1] + ".md5")
    assert md5sum_check(sidecars_under(tree)) == []
    after = run_client(server, "--json", tree)
    assert after.status == 0
    assert after.records()[1] == {"OK": 19}


def test_update_keeps_a_foreign_file_that_took_a_missing_sidecars_place(server, tmp_path):
    tree = tmp_path / "tree"
    files = make_tree(tree, files=5)
    run_client(server, tree)
    os.unlink(files[2])
    sidecar = files[2] + ".md5"
    with open(sidecar, "w") as f:        # someone's own file now, not a sidecar of ours
        f.write(f"{'0' * 32}  another-name\n")
    result = run_client(server, "--json", "--update", tree)
    records, _ = result.records()
    assert os.path.exists(sidecar), "a file that is not our sidecar was removed"
    assert records[files[2]]["status"] == "MISSING", "the catalog knew it"
    assert records[sidecar]["status"] == "NEW", "checked as a file of its own"


def _md5(path):
    import hashlib
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def _expected(path):
    with open(path + ".md5") as f:
        return f.read().split()[0]


def test_excluded_files_that_are_gone_are_not_missing(server, tmp_path):
    tree = tmp_path / "tree"
    make_tree(tree, files=6, dirs=2)
    (tree / "app.log").write_text("log lines")
    run_client(server, tree)
    os.unlink(tree / "app.log")
    os.unlink(tree / "d1" / "f1.dat")
    result = run_client(server, "--json", "--update", "--exclude", "*.log",
                        "--exclude", "d1/f1.dat", tree)
    assert result.status == 0 and result.records()[1] == {"OK": 5}, result.stdout
    assert (tree / "app.log.md5").exists(), "an excluded file's sidecar was removed"


def test_temp_sidecars_in_flight_are_not_checked(server, tmp_path):
    tree = tmp_path / "tree"
    make_tree(tree, files=3, dirs=1)
    (tree / "d0" / ".osp-4242-7.tmp").write_text("a worker's sidecar being written")
    records, summary = run_client(server, "--json", tree).records()
    assert summary == {"NEW": 3}
    assert not (tree / "d0" / ".osp-4242-7.tmp.md5").exists()


class TestForgetOnlyWhatIsStillMissing:
    """--update removes a MISSING file's sidecar at the end of a round trip
    through the server: the file may be back by then, or its directory a
    symlink into another tree. Driven directly: no timing could hit the window."""

    def orphan(self, directory):
        from osproject.client.lister import Lister
        [entry] = [e for e in Lister().walk(str(directory))
                   if getattr(e, "status", None) == "MISSING"]
        return entry

    def client(self):
        from osproject.client.checkers import Client
        from osproject.client.report import Report
        return Client(connection=None, report=Report(open(os.devnull, "w")))

    def tree_with_a_missing_file(self, root):
        root.mkdir()
        (root / "f").write_text("content")
        (root / "f.md5").write_text(f"{'0' * 32}  f\n")
        os.unlink(root / "f")
        return self.orphan(root)

    def test_a_file_still_missing_loses_its_sidecar(self, tmp_path):
        entry = self.tree_with_a_missing_file(tmp_path / "a")
        assert self.client().forget(entry) is None
        assert not (tmp_path / "a" / "f.md5").exists()

    def test_a_file_back_since_the_listing_keeps_its_sidecar(self, tmp_path):
        entry = self.tree_with_a_missing_file(tmp_path / "a")
        (tmp_path / "a" / "f").write_text("back again")
        assert self.client().forget(entry) == "sidecar kept: the file is back"
        assert (tmp_path / "a" / "f.md5").exists()

    def test_a_directory_swapped_for_a_symlink_leads_nowhere(self, tmp_path):
        entry = self.tree_with_a_missing_file(tmp_path / "a")
        other = tmp_path / "other"
        other.mkdir()
        (other / "f.md5").write_text(f"{'1' * 32}  f\n")   # another tree's baseline
        os.rename(tmp_path / "a", tmp_path / "a.old")
        os.symlink(other, tmp_path / "a")
        assert "directory was replaced" in self.client().forget(entry)
        assert (other / "f.md5").exists() and (tmp_path / "a.old" / "f.md5").exists()


def test_asking_for_the_status_ends_its_session_as_served_not_as_vanished(server):
    """--status once closed its FIFOs before the bye: every status call logged a
    warning that a client vanished."""
    for _ in range(2):
        assert run_client(server, "--status").status == 0
    server.wait_event("session.closed", count=2)
    assert server.events("session.dropped") == []
