"""Ids and names are matched whole: "$" (so ``re.match`` with ``^...$``) lets a trailing newline through."""

from __future__ import annotations

import pytest

from layercard_service.control.deployments import adapter_id_from_name
from layercard_service.domain.jobs import check_id, job_id_from_name
from layercard_service.errors import InvalidArgument
from layercard_service.runners.kubernetes.manifest import job_label, job_name
from layercard_service.serving.inference import resolve_served_name, served_id
from layercard_service.serving.vllm_api import ServedModel

TAILS = ["\n", " ", "\t", "\r\n", "\x00", "\v"]


@pytest.mark.parametrize("tail", TAILS, ids=repr)
def test_ids_and_names_with_trailing_whitespace_are_refused(tail):
    assert check_id("base1", "adapter_id") == "base1"
    with pytest.raises(InvalidArgument) as err:
        check_id("base1" + tail, "adapter_id")
    assert err.value.violations[0].field == "adapter_id"
    with pytest.raises(InvalidArgument):
        job_id_from_name("tuningJobs/job1" + tail)
    with pytest.raises(InvalidArgument):
        adapter_id_from_name("adapters/base1" + tail)
    with pytest.raises(InvalidArgument):
        check_id(tail + "base1", "adapter_id")


def test_served_names_parse_whole_and_an_id_with_a_newline_still_parses():
    assert served_id("bot@v3") == "bot"
    assert served_id("base1\n@v1") == "base1\n"  # an id an older check accepted: still recognised as ours
    assert served_id("bot@v3\n") is None  # not a name served_name() writes
    assert served_id("bot@v٣") is None  # \d would take other scripts' digits
    assert served_id("plain") is None
    models = [ServedModel("base", None), ServedModel("bot@v1", "base"), ServedModel("bot@v2\n", "base")]
    assert resolve_served_name(models, "bot") == "bot@v1"


@pytest.mark.parametrize("tail", ["\n", " "], ids=repr)
def test_kubernetes_names_and_labels_are_used_verbatim_only_when_valid_whole(tail):
    assert job_name("job1") == "layercard-job1"
    assert job_label("job1") == "job1"
    assert job_name("job1" + tail) != "layercard-job1" + tail  # not a DNS label: the hashed form
    assert job_label("job1" + tail) != "job1" + tail
