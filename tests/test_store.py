"""Sidecar format and writing, checked against the real md5sum."""

import hashlib
import os
import subprocess

import pytest

from osproject import store

NAMES = [b"plain.txt", b"with space", b"-leading-dash", b"back\\slash",
         b"new\nline", b"carriage\rreturn", b"caf\xe9-latin1", b"\xff\xfe",
         b"all\\of\nthem\r"]


@pytest.mark.parametrize("name", NAMES, ids=repr)
def test_format_round_trips_and_md5sum_agrees(tmp_path, name):
    directory = os.fsencode(tmp_path)
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(b"content of " + name)
    digest = hashlib.md5(b"content of " + name).hexdigest()
    line = store.format_line(digest, name)
    assert store.parse_line(line) == (digest, name)
    ours = os.path.join(directory, name + b".md5")
    with open(ours, "wb") as f:
        f.write(line)
    real = subprocess.run([b"md5sum", b"--", name], cwd=directory,
                          capture_output=True, check=True).stdout
    assert real == line, "our line differs from md5sum's own"
    check = subprocess.run([b"md5sum", b"-c", b"--", name + b".md5"], cwd=directory,
                           capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("bad", [b"", b"nothex  name\n", b"0" * 31 + b"  x\n",
                                 b"0" * 32 + b"  a\nsecond\n", b"\\" + b"0" * 32 + b"  a\\q\n"])
def test_parse_refuses_what_is_not_one_md5sum_line(bad):
    with pytest.raises(store.SidecarError):
        store.parse_line(bad)


def test_write_is_atomic_and_never_clobbers_without_replace(tmp_path):
    sidecar = str(tmp_path / "f.md5")
    assert store.write_sidecar(sidecar, "a" * 32, "f", replace=False)
    assert not store.write_sidecar(sidecar, "b" * 32, "f", replace=False)
    assert store.read_baseline(sidecar, "f") == "a" * 32
    assert store.write_sidecar(sidecar, "b" * 32, "f", replace=True)
    assert store.read_baseline(sidecar, "f") == "b" * 32
    assert sorted(os.listdir(tmp_path)) == ["f.md5"], "a temp file was left behind"


def test_write_replaces_a_planted_symlink_and_hard_link_without_writing_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "a.md5").symlink_to(victim)
    os.link(victim, tmp_path / "b.md5")
    store.write_sidecar(str(tmp_path / "a.md5"), "c" * 32, "a", replace=True)
    store.write_sidecar(str(tmp_path / "b.md5"), "d" * 32, "b", replace=True)
    assert victim.read_bytes() == b"precious"
    assert not os.path.islink(tmp_path / "a.md5")
    assert store.read_baseline(str(tmp_path / "b.md5"), "b") == "d" * 32


def test_read_baseline_refuses_what_is_not_ours(tmp_path):
    (tmp_path / "target").write_bytes(b"0" * 32 + b"  x\n")
    (tmp_path / "link.md5").symlink_to(tmp_path / "target")
    (tmp_path / "other.md5").write_bytes(b"0" * 32 + b"  someone-else\n")
    (tmp_path / "junk.md5").write_bytes(b"my notes\n")
    os.mkfifo(tmp_path / "fifo.md5")
    assert store.read_baseline(str(tmp_path / "none.md5"), "none") is None
    for name, why in [("link", "symlink"), ("other", "names another file"),
                      ("junk", "not an md5sum line"), ("fifo", "not a regular file")]:
        with pytest.raises(store.SidecarError, match=why):
            store.read_baseline(str(tmp_path / f"{name}.md5"), name)


def test_store_mirrors_absolute_paths(tmp_path):
    assert store.sidecar_path("/srv/data/x", str(tmp_path)) == f"{tmp_path}/srv/data/x.md5"
    assert store.sidecar_path("/srv/data/x") == "/srv/data/x.md5"


def test_a_name_too_long_for_its_sidecar_is_an_error_not_a_crash(tmp_path):
    name = "n" * 253                       # fine as a file, too long with ".md5"
    with pytest.raises(OSError):
        store.write_sidecar(str(tmp_path / (name + ".md5")), "e" * 32, name, replace=False)
    assert os.listdir(tmp_path) == []


def test_discard_removes_only_a_sidecar_of_ours(tmp_path):
    ours = tmp_path / "f.md5"
    store.write_sidecar(str(ours), "a" * 32, "f", replace=False)
    (tmp_path / "g.md5").write_text("a user's notes\n")
    (tmp_path / "h.md5").symlink_to(ours)
    assert not store.discard_sidecar(str(tmp_path / "g.md5"), "g")
    assert not store.discard_sidecar(str(tmp_path / "h.md5"), "h")
    assert not store.discard_sidecar(str(ours), "other-name")
    assert store.discard_sidecar(str(ours), "f")
    assert sorted(os.listdir(tmp_path)) == ["g.md5", "h.md5"]


def test_the_common_sidecar_line_reads_as_the_general_grammar_reads_it():
    """parse_line takes `HASH  NAME` without its regex: the same answer, to the byte,
    as the grammar alone gives (`reference`, the function as it was before)."""
    import random
    import re
    line_re = re.compile(rb"(\\?)([0-9a-fA-F]{32}) [ *](.*)", re.DOTALL)

    def reference(line):
        line = line[:-1] if line.endswith(b"\n") else line
        line = line[:-1] if line.endswith(b"\r") else line
        match = line_re.fullmatch(line)
        if not match:
            return "refused"
        escaped, md5, name = match.groups()
        if escaped:
            return "escaped"            # the general way, not the shortcut's
        if b"\n" in name:
            return "refused"
        return md5.decode("ascii").lower(), name

    rng = random.Random(7)
    alphabet = b"0123456789abcdefABCDEF \\*\r\nxyz\x00\xff"
    lines = [b"d41d8cd98f00b204e9800998ecf8427e  f\n", b"D41D8CD98F00B204E9800998ECF8427E  F",
             b"d41d8cd98f00b204e9800998ecf8427e  \n", b"d41d8cd98f00b204e9800998ecf8427e  a\nb",
             b"d41d8cd98f00b204e9800998ecf8427e  a\r\n", b"g41d8cd98f00b204e9800998ecf8427e  f"]
    for _ in range(3000):
        head = bytes(rng.choice(b"0123456789abcdefABCDEFg") for _ in range(32))
        tail = bytes(rng.choice(alphabet) for _ in range(rng.randrange(6)))
        lines.append(head + rng.choice([b"  ", b" *", b" ", b"   "]) + tail)
    for line in lines:
        expected = reference(line)
        if expected == "escaped" or line.startswith(b"MD5 ("):
            continue
        try:
            got = store.parse_line(line)
        except store.SidecarError:
            got = "refused"
        assert got == expected, line
