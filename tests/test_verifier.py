"""The trust model's decisions, as pure functions: no processes, no clock."""

import random
from types import SimpleNamespace

from osproject.server.verifier import (CHANGED, MAX_OPINIONS, NEW, OK, TRUST_AFTER, UNSTABLE,
                                Vote, judge, proven_lie, wants_cross_check)

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
