"""One table of budget kinds (domain/budgets.py): the contract, the domain, the API and the CLI agree with it."""

from __future__ import annotations

import dataclasses

import pytest
from google.protobuf import duration_pb2

from layercard.v1 import placement_pb2
from layercard_client import builders
from layercard_client.cli.parser import BUDGET_FLAGS, budget_from_args, build_parser
from layercard_service.api.placement import budget_from_proto
from layercard_service.domain.budgets import BUDGET_KINDS
from layercard_service.domain.plans import BudgetSpec
from layercard_service.errors import InvalidArgument

NOT_A_LIMIT = {"serving_engine", "serving_concurrency"}  # what the serving limits are for: engine, load
LIMIT_FIELDS = {f.name for f in placement_pb2.Budget.DESCRIPTOR.fields} - NOT_A_LIMIT


def test_every_budget_field_of_the_contract_has_exactly_one_kind_and_every_kind_a_field():
    proto_fields = [kind.proto_field for kind in BUDGET_KINDS]
    assert sorted(proto_fields) == sorted(LIMIT_FIELDS)
    names = [kind.name for kind in BUDGET_KINDS]
    assert len(set(names)) == len(names)


def test_budget_spec_has_one_field_per_kind():
    fields = {f.name for f in dataclasses.fields(BudgetSpec)} - NOT_A_LIMIT
    assert fields == {kind.name for kind in BUDGET_KINDS}


@pytest.mark.parametrize("kind", BUDGET_KINDS, ids=lambda k: k.name)
def test_each_contract_field_reaches_its_domain_limit(kind):
    budget = placement_pb2.Budget()
    if kind.proto_field == "max_training_time":
        budget.max_training_time.CopyFrom(duration_pb2.Duration(seconds=3, nanos=500_000_000))
        expected = 3.5
    else:
        setattr(budget, kind.proto_field, 3)
        expected = 3
    spec = budget_from_proto(budget)
    assert spec.limit(kind) == expected
    assert all(spec.limit(other) is None for other in BUDGET_KINDS if other is not kind)


@pytest.mark.parametrize("kind", BUDGET_KINDS, ids=lambda k: k.name)
def test_each_kind_refuses_a_negative_limit_naming_the_contract_field(kind):
    with pytest.raises(InvalidArgument) as err:
        BudgetSpec(**{kind.name: -1})
    assert [v.field for v in err.value.violations] == [f"budget.{kind.proto_field}"]


def test_the_cli_has_a_flag_for_exactly_the_contract_budget_fields():
    fields = [field for _, field, *_ in BUDGET_FLAGS]
    assert sorted(fields) == sorted(LIMIT_FIELDS)
    argv = ["plan", "layerCards/x", "--serving-engine", "peft", "--serving-concurrency", "4"]
    for flag, *_ in BUDGET_FLAGS:
        argv += [flag, "2"]
    budget = builders.budget(budget_from_args(build_parser().parse_args(argv)))
    assert all(budget.HasField(name) for name in LIMIT_FIELDS)
    assert budget.max_training_time.seconds == 2 and budget.serving_engine == 2  # SERVING_ENGINE_PEFT
    assert budget.serving_concurrency == 4
