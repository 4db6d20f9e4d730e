"""A job's hyperparameters at creation: the plan's steps and learning rate fill what the request leaves unset."""

from __future__ import annotations

import pytest

from layercard_service.control.job_requests import DEFAULT_LEARNING_RATE, HyperparameterRequest, hyperparameters
from layercard_service.errors import InvalidArgument


def test_an_unset_learning_rate_takes_the_plans_then_the_default():
    planned, _ = hyperparameters(HyperparameterRequest(), 64, 30, False, planned_learning_rate=3e-3)
    assert planned.learning_rate == 3e-3 and planned.steps == 30
    unplanned, _ = hyperparameters(HyperparameterRequest(), 64, 0, False)
    assert unplanned.learning_rate == DEFAULT_LEARNING_RATE
    given, _ = hyperparameters(HyperparameterRequest(learning_rate=5e-4), 64, 30, False, planned_learning_rate=3e-3)
    assert given.learning_rate == 5e-4  # the caller's wins


def test_a_bad_learning_rate_names_its_field():
    with pytest.raises(InvalidArgument) as info:
        hyperparameters(HyperparameterRequest(learning_rate=-1.0), 64, 0, False)
    assert info.value.violations[0].field == "hyperparameters.learning_rate"
