"""The noise curriculum: the paper's exponential schedule, validation and exact resume."""

import itertools
import math

import pytest

from zerosearch.curriculum import NoiseCurriculum, noise_probability


def test_formula_endpoints_and_midpoint():
    kw = {"total_steps": 100, "start": 0.1, "end": 0.7, "base": 4.0}
    assert noise_probability(0, **kw) == pytest.approx(0.1)
    assert noise_probability(100, **kw) == pytest.approx(0.7)
    # 4 ** 0.5 = 2 -> (2 - 1) / (4 - 1) = 1/3 of the way: 0.1 + 0.6 / 3
    assert noise_probability(50, **kw) == pytest.approx(0.3)
    # 4 ** 0.25 = sqrt(2) -> 0.1 + 0.6 * (sqrt(2) - 1) / 3
    assert noise_probability(25, **kw) == pytest.approx(0.1 + 0.2 * (math.sqrt(2) - 1))


def test_base_below_one_ramps_fast_first():
    # 0.25 ** 0.5 = 0.5 -> (0.5 - 1) / (0.25 - 1) = 2/3 of the way at the midpoint
    assert noise_probability(50, 100, 0.0, 0.9, base=0.25) == pytest.approx(0.6)


def test_monotone_and_held_at_end():
    probs = [noise_probability(s, 40, 0.0, 0.75) for s in range(60)]
    assert all(b > a for a, b in itertools.pairwise(probs[:41]))
    assert probs[40:] == [0.75] * 20
    decreasing = [noise_probability(s, 40, 0.8, 0.2) for s in range(41)]
    assert all(b < a for a, b in itertools.pairwise(decreasing))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"step": 0, "total_steps": 0, "start": 0.0, "end": 0.5}, "total_steps"),
        ({"step": 0, "total_steps": 10, "start": 0.0, "end": 0.5, "base": 1.0}, "base"),
        ({"step": 0, "total_steps": 10, "start": 0.0, "end": 0.5, "base": -2.0}, "base"),
        ({"step": 0, "total_steps": 10, "start": -0.1, "end": 0.5}, "start"),
        ({"step": 0, "total_steps": 10, "start": 0.0, "end": 1.5}, "end"),
        ({"step": -1, "total_steps": 10, "start": 0.0, "end": 0.5}, "step"),
    ],
)
def test_validation_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        noise_probability(**kwargs)


def test_curriculum_validates_on_construction():
    with pytest.raises(ValueError, match="total_steps"):
        NoiseCurriculum(start=0.0, end=0.5, total_steps=0)


def test_curriculum_tracks_the_function():
    cur = NoiseCurriculum(start=0.0, end=0.75, total_steps=10)
    seen = [cur.probability()] + [cur.at(k) for k in range(1, 13)]
    assert seen == [noise_probability(s, 10, 0.0, 0.75) for s in range(13)]
    assert cur.step == 12
    assert cur.metrics() == {"curriculum/p_noisy": 0.75, "curriculum/step": 12.0}


def test_state_dict_round_trip_reproduces_sequence():
    cur = NoiseCurriculum(start=0.05, end=0.6, total_steps=20, base=3.0)
    cur.at(7)
    state = cur.state_dict()
    expected = [cur.probability()] + [cur.at(k) for k in range(8, 23)]

    resumed = NoiseCurriculum(start=0.05, end=0.6, total_steps=20, base=3.0)
    resumed.load_state_dict(state)
    assert resumed.step == 7
    assert [resumed.probability()] + [resumed.at(k) for k in range(8, 23)] == expected
    with pytest.raises(ValueError, match=">= 0"):
        resumed.at(-1)


def test_load_state_dict_rejects_a_different_schedule():
    state = NoiseCurriculum(start=0.0, end=0.5, total_steps=20, step=3).state_dict()
    other = NoiseCurriculum(start=0.0, end=0.75, total_steps=20)
    with pytest.raises(ValueError, match="end"):
        other.load_state_dict(state)


def test_a_run_trained_past_its_saved_schedule_keeps_the_ramp_with_curriculum_steps():
    """Raising trainer.total_steps on resume changes the ramp, which resume refuses with a hint; keeping the old
    ramp (search.curriculum_steps) trains on at the end noise."""
    from zerosearch.config import ConfigError, load_config
    from zerosearch.curriculum import curriculum_steps

    saved = NoiseCurriculum(0.0, 0.5, curriculum_steps(load_config("cpu", ["trainer.total_steps=12"])))
    saved.at(12)
    longer = load_config("cpu", ["trainer.total_steps=24"])
    refused = NoiseCurriculum(0.0, 0.5, curriculum_steps(longer))
    with pytest.raises(ValueError, match="search.curriculum_steps=12"):
        refused.load_state_dict(saved.state_dict())

    kept = load_config("cpu", ["trainer.total_steps=24", "search.curriculum_steps=12"])
    resumed = NoiseCurriculum(0.0, 0.5, curriculum_steps(kept))
    resumed.load_state_dict(saved.state_dict())
    assert [resumed.at(k) for k in range(13, 25)] == [0.5] * 12
    fresh = NoiseCurriculum(0.0, 0.5, curriculum_steps(kept))  # a fresh run ramps over 12 steps, then holds
    assert fresh.at(6) == noise_probability(6, 12, 0.0, 0.5) < fresh.at(12) == fresh.at(20) == 0.5
    with pytest.raises(ConfigError, match="curriculum_steps"):
        load_config("cpu", ["search.curriculum_steps=-1"])
