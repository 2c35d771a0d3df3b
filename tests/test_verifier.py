"""The trust model's rules, as pure functions: no processes, no clock."""

import random
from types import SimpleNamespace

import pytest

from osproject.server import verifier
from osproject.server.scheduler import Job, Phase
from osproject.server.verifier import (
    CHANGED,
    MAX_OPINIONS,
    NEW,
    OK,
    TRUST_AFTER,
    UNSTABLE,
    Verdict,
    Vote,
    judge,
    proven_lie,
    wants_cross_check,
)

A, B, C, D = ("a" * 32, "b" * 32, "c" * 32, "d" * 32)
SAME = (100, 1, 1, 7)


def vote(wid, md5, stat=SAME, racy=False):
    return Vote(wid, md5, stat, racy)


def test_matching_the_baseline_is_ok_with_one_opinion():
    v = judge(A, [vote(1, A)], cross_check=False)
    assert (v.status, v.md5, v.liars) == (OK, A, ())


def test_a_mismatch_asks_for_a_second_opinion():
    assert judge(A, [vote(1, B)], cross_check=False) is None


def test_second_opinion_agreeing_with_baseline_convicts_the_first():
    v = judge(A, [vote(1, B), vote(2, A)], cross_check=False)
    assert (v.status, v.md5, v.liars) == (OK, A, (1,))


def test_two_workers_agreeing_against_the_baseline_is_a_real_change():
    v = judge(A, [vote(1, B), vote(2, B)], cross_check=False)
    assert (v.status, v.md5, v.liars) == (CHANGED, B, ())


def test_three_way_disagreement_takes_a_third_opinion_then_majority():
    assert judge(A, [vote(1, B), vote(2, C)], cross_check=False) is None
    v = judge(A, [vote(1, B), vote(2, C), vote(3, C)], cross_check=False)
    assert (v.status, v.md5, v.liars) == (CHANGED, C, (1,))
    v = judge(A, [vote(1, B), vote(2, C), vote(3, A)], cross_check=False)
    assert (v.status, v.liars) == (OK, (1, 2))


def test_two_liars_among_three_do_not_stop_the_search_for_a_majority():
    assert judge(None, [vote(1, B), vote(2, C), vote(3, D)], cross_check=True) is None
    v = judge(None, [vote(1, B), vote(2, C), vote(3, D), vote(4, D)], cross_check=True)
    assert (v.status, v.md5, v.liars) == (NEW, D, (1, 2))


def test_no_majority_after_the_last_opinion_is_unstable():
    E = "e" * 32
    opinions = [vote(1, B), vote(2, C), vote(3, D), vote(4, E), vote(5, A + "x")]
    assert len(opinions) == MAX_OPINIONS
    v = judge(None, opinions, cross_check=True)
    assert (v.status, v.liars) == (UNSTABLE, ())
    v = judge(None, opinions[:3], cross_check=True, max_opinions=3)
    assert (v.status, v.liars) == (UNSTABLE, ())


def test_a_file_that_moved_between_readings_is_unstable_and_nobody_is_warned():
    v = judge(A, [vote(1, B, stat=(100, 1, 1, 7)), vote(2, C, stat=(101, 2, 2, 7))],
              cross_check=False)
    assert (v.status, v.liars) == (UNSTABLE, ())


def test_an_outvoted_reading_of_another_version_is_not_a_lie():
    v = judge(A, [vote(1, B, stat=(100, 1, 1, 7)), vote(2, A, stat=(100, 2, 2, 7))],
              cross_check=False)
    assert (v.status, v.liars) == (OK, ())


def test_a_racy_reading_is_never_punished():
    v = judge(A, [vote(1, B, racy=True), vote(2, A)], cross_check=False)
    assert (v.status, v.liars) == (OK, ())


def test_new_file_single_opinion_is_accepted_unchecked_when_no_check_is_due():
    v = judge(None, [vote(1, A)], cross_check=False)
    assert (v.status, v.md5, v.checked) == (NEW, A, False)


def test_new_file_cross_check_agrees_or_outvotes():
    assert judge(None, [vote(1, A)], cross_check=True) is None
    v = judge(None, [vote(1, A), vote(2, A)], cross_check=True)
    assert (v.status, v.md5, v.checked, v.liars) == (NEW, A, True, ())
    assert judge(None, [vote(1, B), vote(2, A)], cross_check=True) is None
    v = judge(None, [vote(1, B), vote(2, A), vote(3, A)], cross_check=True)
    assert (v.status, v.md5, v.liars) == (NEW, A, (1,))


def test_fresh_and_warned_workers_are_always_cross_checked():
    rng = random.Random(1)
    fresh = SimpleNamespace(warnings=0, confirmed=TRUST_AFTER - 1)
    trusted = SimpleNamespace(warnings=0, confirmed=TRUST_AFTER)
    warned = SimpleNamespace(warnings=1, confirmed=10_000)
    assert all(wants_cross_check(fresh, 0.0, rng) for _ in range(100))
    assert all(wants_cross_check(warned, 0.0, rng) for _ in range(100))
    assert not any(wants_cross_check(trusted, 0.0, rng) for _ in range(100))
    sampled = sum(wants_cross_check(trusted, 0.1, rng) for _ in range(10_000))
    assert 800 < sampled < 1200


def test_a_lie_is_proven_only_with_the_agreed_hash_read_before_and_after_it():
    # The baseline is the reading before; the majority's last is after.
    assert proven_lie(A, [vote(1, B), vote(2, A)], 1, A)
    assert proven_lie(None, [vote(1, A), vote(2, B), vote(3, A)], 2, A)
    # Only later readings agree: the file may have moved after the first.
    assert not proven_lie(None, [vote(1, B), vote(2, A), vote(3, A)], 1, A)
    assert not proven_lie(A, [vote(1, B), vote(2, C), vote(3, C)], 1, C)
    opinions = [vote(1, B), vote(2, C), vote(3, D), vote(4, D)]
    assert not any(proven_lie(None, opinions, wid, D) for wid in (1, 2))


# -- the rules that say who reads a job next and what it does with its sidecar --


def job(**fields):
    return Job(session=None, rid=1, index=0, path="/t/f",
               **{"sidecar": "/t/f.md5", **fields})


def test_a_worker_gives_one_opinion_of_a_file_and_none_after_declining():
    j = job(opinions=[vote(1, A)], declined={2})
    assert [w for w in (1, 2, 3) if verifier.may_read(j, w)] == [3]


def test_a_repair_goes_to_any_worker_but_the_liars_and_a_discard_to_anyone():
    j = job(opinions=[vote(1, B), vote(2, A), vote(3, A)], losers={1}, reverify_of=4)
    j.enter(Phase.REPAIRING)
    assert [w for w in (1, 2, 3, 4, 5) if verifier.may_read(j, w)] == [2, 3, 5]
    j = job(opinions=[vote(1, A)], declined={2})
    j.enter(Phase.DISCARDING)
    assert all(verifier.may_read(j, w) for w in (1, 2, 3))


def test_the_accused_reads_its_proof_first_and_only_it():
    j = job(opinions=[vote(2, A)], proving=1)
    assert [w for w in (1, 2, 3) if verifier.may_read(j, w)] == [1]
    j.opinions.append(vote(1, B))
    assert [w for w in (1, 2, 3) if verifier.may_read(j, w)] == [3]


def test_write_modes_follow_the_phase_and_the_readings():
    assert verifier.write_mode(job()) == "new"
    assert verifier.write_mode(job(retried=True)) == "replace", "a dead worker's sidecar"
    assert verifier.write_mode(job(opinions=[vote(1, A)])) == "keep"
    assert verifier.write_mode(job(expected=A)) == "keep"
    assert verifier.write_mode(job(sidecar=None)) == "keep"
    assert verifier.write_mode(job(reverify_of=1)) == "keep"
    repairing, discarding = job(expected=A), job()
    repairing.enter(Phase.REPAIRING)
    discarding.enter(Phase.DISCARDING)
    assert verifier.write_mode(repairing) == "replace"
    assert verifier.write_mode(discarding) == "discard"


def test_a_sidecar_is_repaired_a_few_times_only_and_only_where_it_must_hold_the_hash():
    lie = job(written=B)
    agreed = Verdict(NEW, A)
    assert verifier.sidecar_is_wrong(lie, agreed) and verifier.needs_repair(lie, agreed)
    lie.repairs = verifier.MAX_REPAIRS
    assert verifier.sidecar_is_wrong(lie, agreed) and not verifier.needs_repair(lie, agreed)
    assert not verifier.sidecar_is_wrong(job(written=A), agreed)
    assert not verifier.sidecar_is_wrong(job(expected=B, written=None), Verdict(CHANGED, A)), \
        "without --update a changed file keeps its baseline"
    assert verifier.sidecar_is_wrong(job(expected=B, update=True), Verdict(CHANGED, A))
    assert not verifier.sidecar_is_wrong(job(written=B, proving=1), agreed), \
        "a proof reads only"
    assert not verifier.sidecar_is_wrong(job(written=B, write_error="EROFS"), agreed)


def test_a_sidecar_written_for_a_file_that_then_agreed_on_no_hash_is_discarded_once():
    unvouched = job(written=A)
    assert verifier.needs_discard(unvouched, Verdict(UNSTABLE))
    assert not verifier.needs_discard(unvouched, Verdict(NEW, A))
    assert not verifier.needs_discard(job(written=A, expected=A), Verdict(UNSTABLE))
    assert not verifier.needs_discard(job(), Verdict(UNSTABLE)), "nothing was written"
    unvouched.enter(Phase.DISCARDING)
    assert not verifier.needs_discard(unvouched, Verdict(UNSTABLE)), "discarding already"


def test_a_reading_without_a_hash_needs_a_second_one_only_against_a_baseline():
    assert verifier.wants_second_reading(job(expected=A))
    assert not verifier.wants_second_reading(job())
    assert not verifier.wants_second_reading(job(expected=A, declined={1}))
    assert not verifier.wants_second_reading(job(expected=A, reverify_of=1))
    assert [verifier.without_hash(r).status for r in
            ({"unstable": "moved"}, {"skipped": "FIFO"}, {"error": "EIO"}, {})] \
        == ["UNSTABLE", "SKIPPED", "ERROR", "ERROR"]


def test_what_the_client_is_told_when_the_sidecar_could_not_be_written():
    assert verifier.client_verdict(job(write_error="EROFS"), Verdict(NEW, A)) \
        == ("ERROR", A, "EROFS")
    assert verifier.client_verdict(job(write_error="EROFS"), Verdict(CHANGED, A)) \
        == ("CHANGED", A, "baseline not updated: EROFS")
    assert verifier.client_verdict(job(), Verdict("ERROR", A, checked=False)) \
        == ("ERROR", None, None), "one worker's hash of a failed file is not shown"
    assert verifier.client_verdict(job(), Verdict(OK, A)) == (OK, A, None)


def test_bans_deaths_and_poison_files():
    assert [verifier.banned(n) for n in range(verifier.MAX_WARNINGS + 2)] \
        == [False] * (verifier.MAX_WARNINGS + 1) + [True]
    assert verifier.blamed_for_death(None) and verifier.blamed_for_death("hung")
    assert not any(verifier.blamed_for_death(why) for why in ("banned", "faulty"))
    assert not verifier.is_poison(verifier.MAX_DEATHS - 1)
    assert verifier.is_poison(verifier.MAX_DEATHS)


def test_a_job_moves_only_along_its_transition_table():
    j = job()
    j.enter(Phase.REPAIRING)
    j.enter(Phase.REPAIRING)            # another try
    j.enter(Phase.DISCARDING)
    j.enter(Phase.DONE)
    for phase in Phase:
        with pytest.raises(RuntimeError):
            j.enter(phase)              # done is done
    with pytest.raises(RuntimeError):
        job(phase=Phase.DISCARDING).enter(Phase.REPAIRING)


def test_an_excused_reading_is_named_so_it_earns_no_trust():
    v = judge(A, [vote(1, B, racy=True), vote(2, A), vote(3, C, stat=(9, 9, 9, 9))],
              cross_check=False)
    assert (v.status, v.liars, v.excused) == (OK, (), (1, 3))
    assert judge(A, [vote(1, B), vote(2, A)], cross_check=False).excused == ()
