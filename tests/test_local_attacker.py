"""A local user against a check run by root: the entrance path and a directory
swapped for a symlink mid-run (issue 10).

The attacker is a real process of another uid; the client runs as root, as
`sudo integrity-client /srv` or a root cron job would.  Whatever the
attacker does, nothing outside the tree is read or written.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from helpers import CLIENT, files_in, make_tree, run_client, wait_until, workers_frozen

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to play two uids")]

INTRUDER = 65534                  # nobody
HELLO_BYTES = 600                 # more than any hello: the target must keep them all


@pytest.fixture
def shared_dir():
    """A directory both uids can reach (tmp_path is root's own, 0700)."""
    path = tempfile.mkdtemp(prefix="osp-attack-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_intruder(*argv):
    """Run a command as the intruder's uid and wait for it."""
    subprocess.run(argv, check=True, timeout=30, preexec_fn=_drop_privileges)


def _drop_privileges():
    os.setgroups([])
    os.setgid(INTRUDER)
    os.setuid(INTRUDER)


def client_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("INTEGRITY_FIFO", "XDG_RUNTIME_DIR")}
    env.update(extra)
    return env


def run_default_client(tree, env):
    """The client with its default entrance (no --fifo)."""
    return subprocess.run([sys.executable, CLIENT, str(tree)], env=env, capture_output=True,
                          text=True, timeout=30)


def valuable(path):
    """A file the intruder wants overwritten, and its bytes as they must stay."""
    data = b"root:$6$precious$hash:19000:0:99999:7:::\n" * (HELLO_BYTES // 40 + 1)
    path.write_bytes(data)
    return data


@pytest.mark.processes
class TestTheClientJudgesItsEntrance:
    """Nothing is ever written to an entrance path that is not a server's FIFO."""

    def refused(self, fifo, tmp_path):
        tree = tmp_path / "tree"
        tree.mkdir(exist_ok=True)
        result = run_client(str(fifo), tree, timeout=30)
        assert result.status == 2, result.stderr
        assert str(fifo) in result.stderr
        return result.stderr

    def test_a_regular_file_is_refused_and_left_alone(self, tmp_path):
        target = tmp_path / "important.conf"
        data = valuable(target)
        assert "not a FIFO" in self.refused(target, tmp_path)
        assert target.read_bytes() == data

    def test_a_symlink_to_a_regular_file_is_refused(self, tmp_path):
        target = tmp_path / "shadow"
        data = valuable(target)
        (tmp_path / "server.fifo").symlink_to(target)
        assert "symbolic link" in self.refused(tmp_path / "server.fifo", tmp_path)
        assert target.read_bytes() == data

    def test_a_directory_is_refused(self, tmp_path):
        (tmp_path / "dir").mkdir()
        assert "not a FIFO" in self.refused(tmp_path / "dir", tmp_path)
        assert os.listdir(tmp_path / "dir") == []

    def test_someone_elses_fifo_is_refused_and_never_written(self, tmp_path):
        fifo = tmp_path / "theirs.fifo"
        os.mkfifo(fifo, 0o666)
        os.chown(fifo, INTRUDER, INTRUDER)
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)   # as if they listened
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)   # so that empty is EAGAIN
        try:
            assert f"uid {INTRUDER}" in self.refused(fifo, tmp_path)
            with pytest.raises(BlockingIOError):
                os.read(reader, 4096)                  # nothing was written to it
        finally:
            os.close(reader)
            os.close(writer)

    def test_a_symlink_to_a_serving_fifo_is_refused(self, server, tmp_path):
        (tmp_path / "alias.fifo").symlink_to(server.fifo)
        assert "symbolic link" in self.refused(tmp_path / "alias.fifo", tmp_path)
        assert server.events("session.opened") == []

    def test_a_block_device_is_never_opened(self, tmp_path):
        device = tmp_path / "disk"
        os.mknod(device, 0o600 | 0o060000, os.makedev(7, 200))   # a loop device node
        assert "not a FIFO" in self.refused(device, tmp_path)

    def test_a_runtime_directory_made_by_another_uid_is_refused(self, tmp_path):
        runtime = tmp_path / "run"
        (runtime / "osproject").mkdir(parents=True)
        target = tmp_path / "shadow"
        data = valuable(target)
        (runtime / "osproject" / "server.fifo").symlink_to(target)
        os.chown(runtime / "osproject", INTRUDER, INTRUDER)
        result = run_default_client(_tree(tmp_path), client_env(XDG_RUNTIME_DIR=str(runtime)))
        assert result.returncode == 2
        assert str(runtime / "osproject") in result.stderr and "0700" in result.stderr
        assert target.read_bytes() == data

    def test_the_tmp_default_made_first_by_another_uid_is_refused(self, tmp_path):
        """The real default of `sudo integrity-client` (no XDG_RUNTIME_DIR):
        /tmp/osproject-0, made first by a local user, pointing at a root file."""
        planted = f"/tmp/osproject-{os.geteuid()}"
        if os.path.lexists(planted):
            pytest.skip(f"{planted} exists: a real server may be using it")
        os.mkdir(planted, 0o755)
        try:
            target = tmp_path / "shadow"
            data = valuable(target)
            os.symlink(target, os.path.join(planted, "server.fifo"))
            os.chown(planted, INTRUDER, INTRUDER)
            result = run_default_client(_tree(tmp_path), client_env())
            assert result.returncode == 2, result.stderr
            assert planted in result.stderr and "0700" in result.stderr
            assert target.read_bytes() == data
        finally:
            shutil.rmtree(planted)

    def test_no_runtime_directory_yet_says_how_to_start_a_server(self, tmp_path):
        result = run_default_client(_tree(tmp_path), client_env(
            XDG_RUNTIME_DIR=str(tmp_path / "run")))
        assert result.returncode == 2
        assert "no integrity-server is listening" in result.stderr
        assert "start one with: integrity-server" in result.stderr


class TestADirectorySwappedMidRun:
    """The tree's owner swaps a directory for a symlink into root's files while
    a root check runs.  Made deterministic: the workers are stopped until the
    lister has listed everything, then the intruder swaps, then they go on."""

    @pytest.fixture
    def scene(self, shared_dir):
        tree = os.path.join(shared_dir, "tree")
        secret = os.path.join(shared_dir, "secret")        # root's, 0700
        os.mkdir(secret, 0o700)
        for name in ("f0.dat", "f1.dat", "shadow"):
            with open(os.path.join(secret, name), "wb") as f:
                f.write(b"root only: " + name.encode() * 50)
        with open(os.path.join(secret, "shadow.md5"), "wb") as f:
            f.write(b"0" * 32 + b"  shadow\n")
        make_tree(tree, files=60, dirs=3)
        with open(os.path.join(tree, "d0", "shadow"), "wb") as f:
            f.write(b"the tree's own file called shadow\n")
        _chown_tree(shared_dir, INTRUDER)
        os.chown(secret, 0, 0)
        for name in os.listdir(secret):
            os.chown(os.path.join(secret, name), 0, 0)
        return tree, secret

    def swap(self, directory, secret):
        as_intruder("mv", directory, directory + ".old")
        as_intruder("ln", "-s", secret, directory)

    def run_with_swap(self, server, tree, swaps, *args, expected=61):
        """Run the client with the workers frozen; swap once the listing is done."""
        with workers_frozen(server):
            proc = subprocess.Popen([sys.executable, CLIENT, "--fifo", server.fifo, "--json",
                                     *args, tree], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True,
                                    errors="surrogateescape")
            # Every file is with the server, so the lister has listed them all.
            wait_until(lambda: proc.poll() is not None or files_in(server) == expected,
                       timeout=30, what="the server to hold every file")
            for directory, secret in swaps:
                self.swap(directory, secret)
        out, err = proc.communicate(timeout=60)
        return proc.returncode, out, err

    def test_nothing_outside_the_tree_is_read_or_written(self, server, scene):
        tree, secret = scene
        before = _snapshot(secret)
        secret_hashes = _hashes(secret)
        for round_ in range(4):
            victim = os.path.join(tree, f"d{round_ % 3}")
            if round_:
                _restore(os.path.join(tree, f"d{(round_ - 1) % 3}"))
            status, out, err = self.run_with_swap(
                server, tree, [(victim, secret)], *(["--update"] if round_ == 3 else []))
            assert _snapshot(secret) == before, f"round {round_}: {secret} was altered"
            assert not any(h in out + err for h in secret_hashes), "a secret was hashed"
            assert not any(h in open(server.log_path).read() for h in secret_hashes)
            swapped = [line for line in out.splitlines()
                       if f"/d{round_ % 3}/" in line and "replaced" in line]
            assert swapped, f"round {round_}: the swapped files were not reported\n{out}"
            if round_:           # the tree has baselines now: a check that fails
                assert status == 1, err

    def test_a_store_mirror_swapped_mid_run_leads_nowhere(self, server, scene, shared_dir):
        tree, secret = scene
        store = os.path.join(shared_dir, "store")      # the intruder's to write
        os.mkdir(store)
        os.chown(store, INTRUDER, INTRUDER)
        before = _snapshot(secret)
        mirror = os.path.join(store, tree.lstrip("/"), "d1")
        as_intruder("mkdir", "-p", mirror)
        status, out, err = self.run_with_swap(server, tree, [(mirror, secret)],
                                              "--store", store)
        assert _snapshot(secret) == before
        assert "d1/" in out and "cannot write sidecar" in out, out


def _tree(tmp_path):
    """An empty tree to check, beside (not around) the test's catalog."""
    tree = tmp_path / "tree"
    tree.mkdir(exist_ok=True)
    return tree



def _chown_tree(top, uid):
    os.chown(top, uid, uid)
    for directory, dirs, files in os.walk(top):
        for name in dirs + files:
            os.chown(os.path.join(directory, name), uid, uid, follow_symlinks=False)


def _restore(directory):
    """Put the real directory back after a round."""
    os.unlink(directory)
    os.rename(directory + ".old", directory)


def _snapshot(directory):
    """Names, sizes, modes, owners and contents: anything written shows."""
    state = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        st = os.lstat(path)
        with open(path, "rb") as f:
            state[name] = (st.st_size, st.st_mode, st.st_uid, st.st_mtime_ns, f.read())
    return state


def _hashes(directory):
    return [hashlib.md5(open(os.path.join(directory, n), "rb").read()).hexdigest()
            for n in os.listdir(directory)]
