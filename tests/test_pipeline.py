"""Two assignments per worker, in a Server driven by hand: real pipes, fake
workers (the test writes their frames), a fake clock, no processes."""

import os
import select
import signal
import threading

import pytest

from helpers import wait_until
from osproject import protocol
from osproject.server.loop import Config, Server
from osproject.server.scheduler import Job
from osproject.server.session import Unchecked
from osproject.server.supervisor import State, Worker

MD5 = "a" * 32


class Log:
    path = None

    def __init__(self):
        self.events = []

    def emit(self, level, event, **fields):
        self.events.append(event)

    def info(self, event, **fields):
        self.events.append(event)

    warning = error = info


class Session:
    def __init__(self):
        self.outstanding, self.verdicts, self.unchecked = 0, [], Unchecked()
        self.sid, self.said_bye = 1, False

    def expect(self):
        self.outstanding += 1

    def answered(self, verdict, status):
        self.outstanding -= 1
        self.verdicts.append(verdict)

    def answered_ok(self, rid, index):
        self.answered({"id": rid, "i": index, "status": "OK"}, "OK")

    def settled_aside(self):
        self.outstanding -= 1


class Workers:
    """Spawns Workers whose other pipe ends the test holds."""

    def __init__(self):
        self.ends = {}          # pid -> (read end of its assignments, write end of results)
        # Never a real process (Linux's pid_max is at most 2**22, macOS's 99999):
        # a worker the server kills here is signalled for real.
        self.next_pid = 2_000_000_000

    def __call__(self, slot):
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        for fd in (to_w, from_r):
            os.set_blocking(fd, False)
        self.next_pid += 1
        self.ends[self.next_pid] = (to_r, from_w)
        return Worker(slot=slot.index, pid=self.next_pid, wid=self.next_pid,
                      to_worker=to_w, from_worker=from_r)

    def say(self, worker, data):
        view = memoryview(data)
        while view:
            view = view[os.write(self.ends[worker.pid][1], view):]

    def die(self, worker):
        os.close(self.ends[worker.pid][1])

    def close(self):
        for to_r, from_w in self.ends.values():
            for fd in (to_r, from_w):
                try:
                    os.close(fd)
                except OSError:
                    pass


@pytest.fixture
def world(tmp_path):
    workers = Workers()
    server = Server(Config(fifo=str(tmp_path / "fifo"), workers=3), Log(),
                    clock=lambda: 0.0, spawner=workers)
    server.supervisor.start_due()
    first = server.supervisor.slots[0].worker
    workers.say(first, protocol.ready(first.pid))     # one worker ready, two starting
    server.on_worker_readable(first)
    assert server.supervisor.state_of(first) is State.IDLE
    yield server, workers, first
    for w in server.supervisor.workers():
        for fd in (w.to_worker, w.from_worker):
            if fd >= 0:
                os.close(fd)
    workers.close()


def files(session, count, size=100, path_length=10, start=0):
    jobs = []
    for i in range(start, start + count):
        path = "/t/" + f"{i:04d}".rjust(path_length, "x")
        job = Job(session=session, rid=1, index=i, path=path, sidecar=path + ".md5",
                  expected=MD5, size=size, dir=(1, 2))
        session.expect()
        jobs.append(job)
    return jobs


def answer(assignment, **extra):
    return protocol.results(assignment.aid, [
        {"md5": MD5, "size": 1, "mtime": 2, "ctime": 3, "ino": 4, **extra}
        for job in assignment.jobs])


def test_a_worker_takes_a_second_assignment_behind_a_quick_first(world):
    server, _, worker = world
    session = Session()
    for job in files(session, 10):
        server.scheduler.submit(job)
    server.dispatch()
    assert [len(a.jobs) for a in server.supervisor.held(worker)] == [5, 5]


@pytest.mark.parametrize("why", ["big", "suspect"])
def test_nothing_waits_behind_a_big_file_or_one_that_killed_a_worker(world, why):
    server, _, worker = world
    session = Session()
    first = files(session, 1, size=10 * 1024 * 1024 if why == "big" else 100)
    first[0].suspect = why == "suspect"
    server.scheduler.submit(first[0])
    server.dispatch()
    for job in files(session, 5, start=1):
        server.scheduler.submit(job)
    server.dispatch()
    assert [len(a.jobs) for a in server.supervisor.held(worker)] == [1]
    assert len(server.scheduler.pending) == 5, "left for the next worker free"


def two_assignments(server, worker):
    """Ten files for one worker: (their session, the assignment it works on, the one behind)."""
    session = Session()
    for job in files(session, 10):
        server.scheduler.submit(job)
    server.dispatch()
    first, behind = server.supervisor.held(worker)
    return session, first, behind


def test_results_a_worker_wrote_before_it_died_are_read_however_long(world):
    """Results behind more than one read (a big file's progress frames, then
    the answer): the assignment it answers is done, and the one behind it,
    the one the worker died on, is a dead worker's (retried, its temp files
    named), not one it never began."""
    server, workers, worker = world
    session, first, behind = two_assignments(server, worker)
    frame = protocol.progress(first.aid) * 4400 + answer(first)
    assert 65536 < len(frame) < 2 * 65536, "more than one read, less than it and a pipe"

    def worker_writes_and_dies():
        workers.say(worker, frame)                  # blocks until the server reads
        workers.die(worker)
    writer = threading.Thread(target=worker_writes_and_dies)
    writer.start()
    wait_until(lambda: select.select([worker.from_worker], [], [], 0)[0], what="results")
    server.on_worker_readable(worker)                # one pass: one read of 64 KiB
    writer.join(timeout=10)                          # the rest is in the pipe: it died
    assert not writer.is_alive()
    server.on_child_exit(worker.pid, signal.SIGKILL)
    assert [v["status"] for v in session.verdicts] == ["OK"] * 5
    assert all(job.retried and job.stale == [worker.pid] for job in behind.jobs)
    assert "assignment.requeued" in server.log.events
    assert session.outstanding == 5 and len(server.scheduler.pending) == 5


def test_a_worker_killed_for_its_answer_may_have_begun_the_next_assignment(world):
    """Killed for garbage it wrote about the first, it was at work on the one
    behind: those files go back with its pid, so the next worker removes its
    temp files, and may replace a sidecar it wrote."""
    server, workers, worker = world
    session, first, behind = two_assignments(server, worker)
    workers.say(worker, protocol.pack([b"results", b"%d" % first.aid, b"garbage"]))
    server.on_worker_readable(worker)
    assert "worker.faulty" in server.log.events
    assert server.supervisor.state_of(worker) is State.KILLED
    workers.die(worker)
    server.on_child_exit(worker.pid, signal.SIGKILL)
    assert all(job.stale == [worker.pid] and job.retried for job in behind.jobs)
    assert not any(job.deaths or job.suspect for job in behind.jobs), "it did not die on them"
    assert {j.path for j in server.scheduler.pending} == {j.path for j in first.jobs + behind.jobs}
