"""A1111's learning-rate schedule syntax."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.errors import UserError
from app.training.lr_schedule import LR_SCHEDULERS, LearnRateSchedule, parse_schedule, rate_factor


def test_constant_rate_runs_to_max_steps():
    s = LearnRateSchedule("0.005", 1000)
    assert s.rate_at(0) == s.rate_at(999) == 0.005
    assert s.end_step == 1000


def test_piecewise_schedule():
    s = LearnRateSchedule("0.005:100, 1e-3:1000, 1e-5", 3000)
    assert [s.rate_at(i) for i in (0, 99, 100, 999, 1000, 2999)] == [0.005, 0.005, 1e-3, 1e-3, 1e-5, 1e-5]
    assert s.end_step == 3000


def test_last_entry_with_step_ends_training_early():
    assert LearnRateSchedule("0.01:50, 0.001:200", 1000).end_step == 200
    assert LearnRateSchedule("0.01:50, 0.001:200", 120).end_step == 120
    assert LearnRateSchedule("0.01:-1", 77).end_step == 77


def test_whitespace_and_empty_entries_are_free():
    assert [e.rate for e in parse_schedule(" 0.1 : 10 ,, 0.2 ,")] == [0.1, 0.2]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0.01:abc", "'0.01:abc'"),
        ("abc", "does not start with a number"),
        ("0.01:1e3", "whole number"),
        ("", "empty"),
        ("0.1, 0.2", "already runs to the end"),
        ("0.1:100, 0.2:50", "steps must increase"),
        ("-0.1", "finite rate >= 0"),
        ("nan", "finite rate"),
        ("0.1:0", "must be > 0 or -1"),
    ],
)
def test_invalid_schedules_quote_the_bad_part(text, message):
    with pytest.raises(UserError, match="schedule") as info:
        parse_schedule(text)
    assert message in str(info.value)


rates = st.floats(min_value=0, max_value=1, allow_nan=False)


@given(st.lists(st.tuples(rates, st.integers(1, 500)), min_size=1, max_size=6), rates, st.integers(1, 3000))
def test_generated_schedules_parse_and_follow_their_steps(pairs, last_rate, max_steps):
    steps = sorted(set(s for _, s in pairs))
    entries = list(zip([r for r, _ in pairs], steps, strict=False))
    text = ", ".join(f"{r!r}:{s}" for r, s in entries) + f", {last_rate!r}"
    schedule = LearnRateSchedule(text, max_steps)
    for step in range(0, max_steps, max(1, max_steps // 50)):
        expected = next((r for r, s in entries if step < s), last_rate)
        assert schedule.rate_at(step) == expected
    assert schedule.end_step == max_steps


def test_scheduler_shapes_warm_up_then_follow_their_curve():
    end = 110  # steps 0..109, 10 of them warmup
    factor = {name: [rate_factor(name, s, end, warmup=10, cycles=2) for s in range(end)] for name in LR_SCHEDULERS}
    for curve in factor.values():
        assert curve[:10] == pytest.approx([(s + 1) / 11 for s in range(10)])  # warmup: rising, never 0
        assert curve[10] == 1.0  # the full rate when warmup ends
    assert set(factor["constant"][10:]) == {1.0} and factor["constant_with_warmup"] == factor["constant"]
    assert factor["linear"][60] == pytest.approx(0.5) and factor["linear"][-1] == pytest.approx(0.01)
    assert factor["cosine"][60] == pytest.approx(0.5) and factor["cosine"][-1] < 0.001
    assert all(a >= b for a, b in zip(factor["cosine"][10:], factor["cosine"][11:], strict=False))  # only falls
    restarts = factor["cosine_with_restarts"]
    assert restarts[60] == pytest.approx(1.0) and restarts[59] < 0.01 and restarts[35] == pytest.approx(0.5)
    assert rate_factor("cosine", 500, end) == 0.0  # past the end (raised max steps aside): no negative rate
    with pytest.raises(UserError, match="LR scheduler must be one of constant, constant_with_warmup"):
        rate_factor("exponential", 0, 10)


@given(
    st.sampled_from(LR_SCHEDULERS), st.integers(0, 5000), st.integers(1, 5000), st.integers(0, 100), st.integers(1, 9)
)
def test_rate_factors_stay_between_0_and_1(name, step, end, warmup, cycles):
    assert 0.0 <= rate_factor(name, step, end, warmup, cycles) <= 1.0
