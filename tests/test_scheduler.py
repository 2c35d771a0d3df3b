"""The scheduler's order, as pure decisions: urgent jobs first, then the
sessions' files in turn."""

from types import SimpleNamespace

from osproject.server.scheduler import Job, Scheduler


def jobs(session, count, size=0):
    return [Job(session=session, rid=1, index=i, path=f"/{session}/{i}",
                sidecar=f"/{session}/{i}.md5", size=size) for i in range(count)]


def taken(scheduler, wid=1):
    assignment = scheduler.take(SimpleNamespace(wid=wid))
    return [job.path for job in assignment.jobs] if assignment else []


def test_sessions_take_turns_and_urgent_jobs_jump_every_queue():
    scheduler = Scheduler()
    for job in jobs("a", 12):
        scheduler.submit(job)
    for job in jobs("b", 2):
        scheduler.submit(job)
    assert taken(scheduler) == ["/a/0", "/a/1", "/a/2", "/a/3", "/a/4"]
    assert taken(scheduler) == ["/b/0", "/b/1", "/a/5", "/a/6", "/a/7"]
    [urgent] = jobs("c", 1)
    scheduler.submit(urgent, urgent=True)
    assert taken(scheduler) == ["/c/0", "/a/8", "/a/9", "/a/10", "/a/11"]
    assert taken(scheduler) == [] and scheduler.pending == []


def test_a_newcomer_waits_one_turn_of_each_client_at_most():
    scheduler = Scheduler()
    for job in jobs("a", 20, size=8 << 20):           # one per assignment
        scheduler.submit(job)
    assert taken(scheduler) == ["/a/0"]
    scheduler.submit(jobs("b", 1, size=8 << 20)[0])    # behind a, which had a turn
    assert taken(scheduler) == ["/a/1"]
    assert taken(scheduler) == ["/b/0"]
    assert taken(scheduler) == ["/a/2"]
    scheduler.forget("a")
    assert scheduler.pending == []
