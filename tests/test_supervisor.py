"""The supervisor's decisions with a fake clock and fake workers: fast, no fork."""

import os
import signal

import pytest

from osproject.server import supervisor as sup
from osproject.server.supervisor import State, Supervisor, Worker


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class FakeLog:
    def __init__(self):
        self.events = []

    def emit(self, level, event, **fields):
        self.events.append((event, fields))

    def info(self, event, **fields):
        self.emit("info", event, **fields)

    warning = error = info

    def names(self):
        return [e for e, _ in self.events]


class FakeSpawner:
    def __init__(self):
        self.pids = iter(range(5000, 6000))
        self.spawned = []

    def __call__(self, slot):
        pid = next(self.pids)
        self.spawned.append((slot.index, pid))
        return Worker(slot=slot.index, pid=pid, wid=pid)


@pytest.fixture
def world(monkeypatch):
    killed = []
    monkeypatch.setattr(sup, "kill_group", lambda pid, sig: killed.append((pid, sig)))
    clock, log, spawner = FakeClock(), FakeLog(), FakeSpawner()
    s = Supervisor(3, spawner, clock, log, hang_timeout=30)
    s.start_due()
    return s, clock, log, spawner, killed


def exited(code=0):
    return code << 8           # a waitpid status for a normal exit


def busy(s, index):
    """The worker of slot `index`, ready and given an assignment."""
    w = s.slots[index].worker
    s.on_ready(w)
    s.assigned(w, "job")
    return w


def test_every_slot_is_filled_at_start(world):
    s, _, log, spawner, _ = world
    assert [slot.state for slot in s.slots] == [State.STARTING] * 3
    assert log.names().count("worker.forked") == 3


def test_a_dead_worker_that_did_work_is_replaced_at_once(world):
    s, clock, log, spawner, _ = world
    w = busy(s, 1)
    s.answered(w)
    s.on_exit(w.pid, signal.SIGKILL)
    assert s.slots[1].state is State.DOWN
    s.start_due()
    assert s.slots[1].state is State.STARTING and s.slots[1].worker.pid != w.pid


def test_infant_deaths_back_off_exponentially_then_give_up(world):
    s, clock, log, spawner, _ = world
    delays = []
    for _ in range(sup.GIVE_UP_AFTER):
        for slot in s.slots:
            s.on_exit(slot.worker.pid, exited(1))
        delays.append(s.slots[0].restart_at - clock.now)
        forks = len(spawner.spawned)
        s.start_due()
        assert len(spawner.spawned) == forks, "re-forked before its back-off"
        while any(slot.state is State.DOWN for slot in s.slots):
            clock.now = s.next_deadline()
            s.start_due()
        assert len(spawner.spawned) == forks + 3
    assert delays[:4] == pytest.approx([0.1, 0.2, 0.4, 0.8])
    assert max(delays) == sup.BACKOFF_MAX
    assert s.hopeless()


def test_workers_that_start_then_die_are_backed_off_but_never_given_up(world):
    s, clock, log, spawner, _ = world
    for _ in range(3 * sup.GIVE_UP_AFTER):
        for slot in s.slots:
            s.on_ready(slot.worker)
            s.on_exit(slot.worker.pid, exited(70))
        while any(slot.state is State.DOWN for slot in s.slots):
            clock.now = s.next_deadline()
            s.start_due()
    assert s.slots[0].failures == 3 * sup.GIVE_UP_AFTER
    assert not s.hopeless()
    assert "worker.backoff" in log.names()


def test_restarts_after_infant_deaths_never_exceed_the_rate_cap(monkeypatch):
    monkeypatch.setattr(sup, "kill_group", lambda pid, sig: None)
    clock, log, spawner = FakeClock(), FakeLog(), FakeSpawner()
    s = Supervisor(8, spawner, clock, log, hang_timeout=30)
    s.start_due()
    assert len(spawner.spawned) == 8, "the first forks are not capped"
    for slot in s.slots:
        s.on_exit(slot.worker.pid, exited(1))
    clock.now += sup.BACKOFF_FIRST
    s.start_due()
    assert len(spawner.spawned) == 8, "the window is still full of the first forks"
    assert s.next_deadline() == 1001.0
    clock.now = 1001.0
    s.start_due()
    assert len(spawner.spawned) == 8 + sup.MAX_FORKS_PER_SECOND
    clock.now = 1002.0
    s.start_due()
    assert len(spawner.spawned) == 16


def test_a_backoff_scale_shortens_every_wait_and_keeps_every_count(monkeypatch):
    """--backoff-scale, the testing aid: the same policy on a shorter clock."""
    monkeypatch.setattr(sup, "kill_group", lambda pid, sig: None)
    clock, log, spawner = FakeClock(), FakeLog(), FakeSpawner()
    s = Supervisor(8, spawner, clock, log, hang_timeout=30, backoff_scale=0.1)
    s.start_due()
    for slot in s.slots:
        s.on_exit(slot.worker.pid, exited(1))
    assert s.slots[0].restart_at - clock.now == pytest.approx(0.1 * sup.BACKOFF_FIRST)
    clock.now += 0.1 * sup.BACKOFF_FIRST
    s.start_due()
    assert len(spawner.spawned) == 8, "the window, a tenth of a second, is still full"
    assert s.next_deadline() == pytest.approx(1000.1)
    clock.now = s.next_deadline()
    s.start_due()
    assert len(spawner.spawned) == 8 + sup.MAX_FORKS_PER_SECOND
    delays = []
    for deaths in range(2, sup.GIVE_UP_AFTER + 1):
        while any(slot.state is State.DOWN for slot in s.slots):
            clock.now = s.next_deadline()
            s.start_due()
        assert not s.hopeless(), f"gave up after {deaths - 1} deaths"
        for slot in s.slots:
            s.on_exit(slot.worker.pid, exited(1))
        delays.append(s.slots[0].restart_at - clock.now)
    assert s.hopeless(), "given up after as many deaths as unscaled"
    assert delays[:2] == pytest.approx([0.1 * sup.backoff(2), 0.1 * sup.backoff(3)])
    assert max(delays) == pytest.approx(0.1 * sup.BACKOFF_MAX)
    assert sup.backoff(3, 0.1) == pytest.approx(0.1 * sup.backoff(3))


def test_one_good_assignment_resets_the_back_off(world):
    s, clock, _, _, _ = world
    w = s.slots[0].worker
    s.on_exit(w.pid, exited(1))
    clock.now += 1
    s.start_due()
    w = busy(s, 0)
    s.answered(w)
    assert s.slots[0].failures == 0
    assert not s.hopeless()


def test_a_silent_busy_worker_is_killed_as_hung(world):
    s, clock, log, _, killed = world
    for slot in s.slots:
        s.on_ready(slot.worker)
    w = s.slots[2].worker
    s.assigned(w, "job")
    clock.now += 29
    s.check_hangs()
    assert killed == []
    s.heard_from(w)                      # progress on a big file
    clock.now += 29
    s.check_hangs()
    assert killed == []
    clock.now += 2
    s.check_hangs()
    assert killed == [(w.pid, signal.SIGKILL)]
    assert s.slots[2].state is State.KILLED
    assert "worker.hung" in log.names()
    assert s.on_exit(w.pid, signal.SIGKILL) is w
    assert s.slots[2].restart_at == clock.now


def test_a_worker_that_never_says_ready_is_hung(world):
    s, clock, log, _, killed = world
    clock.now += 31
    s.check_hangs()
    assert len(killed) == 3 and log.names().count("worker.hung") == 3


def test_an_idle_worker_is_never_hung(world):
    s, clock, _, _, killed = world
    for slot in s.slots:
        s.on_ready(slot.worker)
    clock.now += 10_000
    s.check_hangs()
    assert killed == [] and s.next_deadline() is None


def test_more_than_two_warnings_ban(world):
    s, _, log, _, killed = world
    w = s.slots[0].worker
    assert not s.warn(w) and not s.warn(w)
    assert s.warn(w)
    assert killed == []
    s.ban(w)
    assert killed == [(w.pid, signal.SIGKILL)]
    assert "worker.banned" in log.names()
    assert not s.warn(w), "a banned worker is not banned twice"
    assert w.warnings == 3


def test_illegal_transitions_are_refused(world):
    s, _, _, _, _ = world
    with pytest.raises(RuntimeError):
        s.slots[0].enter(State.BUSY)     # STARTING -> BUSY skips the ready frame


def waitpid_status(child_main):
    """The status waitpid gives for a forked child that runs child_main()."""
    pid = os.fork()
    if pid == 0:
        try:
            child_main()
        finally:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    return status


def test_exit_status_is_described_for_the_log():
    assert sup.describe_status(exited(3)) == {"exit": 3}
    assert sup.describe_status(signal.SIGKILL) == {"signal": "SIGKILL"}
    # The statuses this file hands to on_exit are the ones waitpid gives.
    killed = waitpid_status(lambda: os.kill(os.getpid(), signal.SIGKILL))
    assert os.WIFSIGNALED(killed) and killed == signal.SIGKILL
    assert sup.describe_status(killed) == {"signal": "SIGKILL"}
    assert waitpid_status(lambda: os._exit(3)) == exited(3)


def test_totals_outlive_the_workers_they_count(world):
    s, clock, _, _, _ = world
    w = busy(s, 1)
    s.tally(w)
    s.tally(w)
    s.answered(w)
    s.ban(w)
    s.on_exit(w.pid, signal.SIGKILL)
    s.start_due()
    assert s.slots[1].worker is not w and s.slots[1].worker.results == 0
    assert (s.totals.files, s.totals.bans, s.totals.reforks) == (2, 1, 1)
    assert w.results == 2


def test_trust_reaches_workers_by_incarnation_only_while_they_live(world):
    s, _, _, _, _ = world
    w = busy(s, 2)
    s.confirm(w.wid)
    assert s.alive(w.wid) is w and w.confirmed == 1
    assert s.note_lie(w.wid) is w and s.totals.warnings == 1
    s.kill(w, "banned")
    assert s.alive(w.wid) is None, "being killed: no longer one to warn"
    assert s.note_lie(w.wid) is None and s.totals.warnings == 2, "its lie still counts"
    s.on_exit(w.pid, signal.SIGKILL)
    s.confirm(w.wid)                    # gone: nothing to credit, and no error
    assert s.alive(w.wid) is None and w.confirmed == 1


def test_chaos_off_means_no_chaos_dice():
    """(From a review.)  The server names every fault, at 0 when off: the
    worker must still see none, and roll no dice for them."""
    from types import SimpleNamespace

    from osproject.server.loop import Server
    from osproject.server.worker import WorkerProcess
    config = SimpleNamespace(crash=0.0, hang=0.0, garble=0.0, stillborn=None, liars={})
    chaos = Server.chaos_for(SimpleNamespace(config=config), SimpleNamespace(forks=0, index=0))
    assert WorkerProcess(0, 1, chaos).chaos == {}
    config.liars = {0: {"lie": 0.2}}
    chaos = Server.chaos_for(SimpleNamespace(config=config), SimpleNamespace(forks=0, index=0))
    assert WorkerProcess(0, 1, chaos).chaos == {"lie": 0.2}
