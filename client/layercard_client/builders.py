"""Request builders shared by the sync and async clients (and the CLI): keyword arguments -> request messages.

Every client method accepts either the request message itself or keyword arguments; the rules for turning
the latter into a message live here once, so the two clients cannot drift apart. Conveniences:
bare ids become resource names ("abc" -> "layerCards/abc"), dataset strings become ``DatasetSource``s,
enum values may be given by short name ("accuracy", "running"), sub-messages may be dicts, and a chat's messages
may be ``("user", "hi")`` pairs or ``{"role": ..., "content": ...}`` dicts.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf import message as pb_message
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from layercard.v1 import (
    adapter_pb2,
    common_pb2,
    inference_pb2,
    layer_card_pb2,
    placement_pb2,
    tuning_pb2,
)

__all__ = [
    "DatasetLike",
    "MessageLike",
    "build",
    "chat_messages",
    "cancel_tuning_job",
    "delete_tuning_job",
    "compute_layer_card",
    "create_tuning_job",
    "dataset_source",
    "deploy_adapter",
    "enum_value",
    "generate",
    "generate_stream",
    "get_layer_card",
    "get_tuning_job",
    "list_adapters",
    "list_layer_cards",
    "list_tuning_jobs",
    "plan_placement",
    "resource_name",
    "undeploy_adapter",
    "watch_tuning_job",
]

M = TypeVar("M", bound=pb_message.Message)
# "builtin:NAME" or a path on the server (str / Path), inline JSONL (bytes), a DatasetSource, or its dict form.
DatasetLike = str | Path | bytes | common_pb2.DatasetSource | Mapping[str, Any]
# One turn of a chat: a ChatMessage, ("user", "hi"), or {"role": "user", "content": "hi"}.
MessageLike = inference_pb2.ChatMessage | tuple[str, str] | Mapping[str, str]


def build(cls: type[M], request: M | None, fields: Mapping[str, Any]) -> M:
    """The request itself, or a new one from the fields; None-valued fields are left unset (the server's default)."""
    given = {key: value for key, value in fields.items() if value is not None}
    if request is not None:
        if not isinstance(request, cls):
            raise TypeError(f"expected a {cls.DESCRIPTOR.full_name}, got {type(request).__name__}")
        if given:
            raise TypeError(f"pass either a {cls.__name__} or keyword fields, not both (got {sorted(given)})")
        return request
    return cls(**given)


def resource_name(collection: str, value: str) -> str:
    """``resource_name("layerCards", "abc")`` -> "layerCards/abc"; a full name passes through unchanged."""
    if not value:
        return value  # let the server report the missing field with its own field violation
    return value if value.startswith(f"{collection}/") else f"{collection}/{value}"


def enum_value(enum: EnumTypeWrapper, value: int | str | None, prefix: str) -> int | None:
    """An enum number from a number, its full name ("OBJECTIVE_ACCURACY") or its short name ("accuracy")."""
    if value is None or isinstance(value, int):
        return value
    name = value.strip().upper().replace("-", "_")
    if not name.startswith(prefix):
        name = prefix + name
    try:
        return enum.Value(name)
    except ValueError:
        choices = ", ".join(n[len(prefix) :].lower() for n in enum.keys() if not n.endswith("_UNSPECIFIED"))  # noqa: SIM118
        raise ValueError(f"unknown value {value!r}; choose from {choices}") from None


def dataset_source(value: DatasetLike | None, split: str | None = None) -> common_pb2.DatasetSource | None:
    """``"builtin:cipher"`` -> a built-in task; other strings and Paths -> a path on the server; bytes -> inline."""
    if value is None:
        return None
    if isinstance(value, common_pb2.DatasetSource):
        source = value
    elif isinstance(value, Mapping):
        source = common_pb2.DatasetSource(**value)
    elif isinstance(value, bytes):
        source = common_pb2.DatasetSource(inline_jsonl=value)
    elif isinstance(value, str) and value.startswith("builtin:"):
        source = common_pb2.DatasetSource(builtin=value)
    else:
        source = common_pb2.DatasetSource(path=str(value))
    if split:
        with_split = common_pb2.DatasetSource()
        with_split.CopyFrom(source)  # never modify a message the caller still holds
        with_split.split = split
        source = with_split
    return source


def _message(cls: type[M], value: M | Mapping[str, Any] | None) -> M | None:
    if value is None or isinstance(value, cls):
        return value
    return cls(**value)


# LayerCardService


def compute_layer_card(
    request: layer_card_pb2.ComputeLayerCardRequest | None,
    *,
    model: str | None,
    dataset: DatasetLike | None,
    lora: common_pb2.LoraShape | Mapping[str, Any] | None,
    fields: Mapping[str, Any],
) -> layer_card_pb2.ComputeLayerCardRequest:
    extra = dict(fields)
    enums = (("device", common_pb2.Device, "DEVICE_"), ("precision", common_pb2.Precision, "PRECISION_"))
    for key, enum, prefix in enums:
        if key in extra:
            extra[key] = enum_value(enum, extra[key], prefix)
    return build(
        layer_card_pb2.ComputeLayerCardRequest,
        request,
        {"model": model, "dataset": dataset_source(dataset), "lora": _message(common_pb2.LoraShape, lora), **extra},
    )


def get_layer_card(name: str | layer_card_pb2.GetLayerCardRequest) -> layer_card_pb2.GetLayerCardRequest:
    if isinstance(name, layer_card_pb2.GetLayerCardRequest):
        return name
    return layer_card_pb2.GetLayerCardRequest(name=resource_name("layerCards", name))


def list_layer_cards(
    request: layer_card_pb2.ListLayerCardsRequest | None,
    *,
    page_size: int | None,
    page_token: str | None,
    model: str | None,
) -> layer_card_pb2.ListLayerCardsRequest:
    fields = {"page_size": page_size, "page_token": page_token, "model": model}
    return build(layer_card_pb2.ListLayerCardsRequest, request, fields)


# PlacementService


def budget(value: placement_pb2.Budget | Mapping[str, Any] | None) -> placement_pb2.Budget | None:
    if isinstance(value, Mapping) and "serving_engine" in value:
        engine = enum_value(common_pb2.ServingEngine, value["serving_engine"], "SERVING_ENGINE_")
        value = {**value, "serving_engine": engine}
    return _message(placement_pb2.Budget, value)


def plan_placement(
    request: placement_pb2.PlanPlacementRequest | str,
    *,
    objective: int | str | None,
    budget_: placement_pb2.Budget | Mapping[str, Any] | None,
    fields: Mapping[str, Any],
) -> placement_pb2.PlanPlacementRequest:
    """``request`` is the message, or the card's name ("layerCards/abc" or "abc")."""
    objective_number = enum_value(placement_pb2.Objective, objective, "OBJECTIVE_")
    given = {"objective": objective_number, "budget": budget(budget_), **fields}
    if isinstance(request, str):
        return build(
            placement_pb2.PlanPlacementRequest, None, {"layer_card": resource_name("layerCards", request), **given}
        )
    return build(placement_pb2.PlanPlacementRequest, request, given)


# TuningService


def create_tuning_job(
    request: tuning_pb2.CreateTuningJobRequest | None,
    *,
    model: str | None,
    training_data: DatasetLike | None,
    adapter_id: str | None,
    fields: Mapping[str, Any],
) -> tuning_pb2.CreateTuningJobRequest:
    """Builds the request and makes it idempotent: an empty ``request_id`` gets a fresh uuid4.

    The id is chosen here, once per logical call, so that gRPC's retries (which replay the same bytes) and
    the server's request_id dedup together make a retried create return the first job, never a second one.
    The caller's message is copied, not modified.
    """
    extra = dict(fields)
    if "validation_data" in extra:
        extra["validation_data"] = dataset_source(extra["validation_data"])
    if "hyperparameters" in extra:
        extra["hyperparameters"] = _message(tuning_pb2.Hyperparameters, extra["hyperparameters"])
    if "card_budget" in extra and isinstance(extra["card_budget"], Mapping):
        card = dict(extra["card_budget"])
        card["layer_card"] = resource_name("layerCards", card.get("layer_card", ""))
        card["objective"] = enum_value(placement_pb2.Objective, card.get("objective"), "OBJECTIVE_")
        card["budget"] = budget(card.get("budget"))
        extra["card_budget"] = tuning_pb2.CardBudget(**{k: v for k, v in card.items() if v is not None})
    explicit = extra.get("explicit_layers")
    if explicit is not None and not isinstance(explicit, tuning_pb2.ExplicitLayers | Mapping):
        extra["explicit_layers"] = tuning_pb2.ExplicitLayers(layers=list(explicit))  # a plain list of indices
    elif isinstance(explicit, Mapping):
        extra["explicit_layers"] = tuning_pb2.ExplicitLayers(**explicit)
    built = build(
        tuning_pb2.CreateTuningJobRequest,
        request,
        {"model": model, "training_data": dataset_source(training_data), "adapter_id": adapter_id, **extra},
    )
    if built.request_id:
        return built
    copy = tuning_pb2.CreateTuningJobRequest()
    copy.CopyFrom(built)
    copy.request_id = str(uuid.uuid4())
    return copy


def _job_name(name: str | Any, cls: type[M]) -> M:
    if isinstance(name, cls):
        return name
    return cls(name=resource_name("tuningJobs", name))


def get_tuning_job(name: str | tuning_pb2.GetTuningJobRequest) -> tuning_pb2.GetTuningJobRequest:
    return _job_name(name, tuning_pb2.GetTuningJobRequest)


def cancel_tuning_job(name: str | tuning_pb2.CancelTuningJobRequest) -> tuning_pb2.CancelTuningJobRequest:
    return _job_name(name, tuning_pb2.CancelTuningJobRequest)


def delete_tuning_job(name: str | tuning_pb2.DeleteTuningJobRequest) -> tuning_pb2.DeleteTuningJobRequest:
    return _job_name(name, tuning_pb2.DeleteTuningJobRequest)


def watch_tuning_job(
    name: str | tuning_pb2.WatchTuningJobRequest, *, after_sequence: int | None
) -> tuning_pb2.WatchTuningJobRequest:
    if isinstance(name, tuning_pb2.WatchTuningJobRequest):
        return build(tuning_pb2.WatchTuningJobRequest, name, {"after_sequence": after_sequence})
    return tuning_pb2.WatchTuningJobRequest(name=resource_name("tuningJobs", name), after_sequence=after_sequence or 0)


def list_tuning_jobs(
    request: tuning_pb2.ListTuningJobsRequest | None,
    *,
    page_size: int | None,
    page_token: str | None,
    states: Iterable[int | str] | None,
) -> tuning_pb2.ListTuningJobsRequest:
    numbers = None
    if states is not None:
        numbers = [enum_value(tuning_pb2.TuningJobState, s, "TUNING_JOB_STATE_") for s in states]
    fields = {"page_size": page_size, "page_token": page_token, "states": numbers}
    return build(tuning_pb2.ListTuningJobsRequest, request, fields)


# AdapterService


def deploy_adapter(
    adapter: str | adapter_pb2.DeployAdapterRequest, *, fields: Mapping[str, Any]
) -> adapter_pb2.DeployAdapterRequest:
    if isinstance(adapter, adapter_pb2.DeployAdapterRequest):
        return build(adapter_pb2.DeployAdapterRequest, adapter, fields)
    return build(adapter_pb2.DeployAdapterRequest, None, {"adapter": resource_name("adapters", adapter), **fields})


def undeploy_adapter(adapter: str | adapter_pb2.UndeployAdapterRequest) -> adapter_pb2.UndeployAdapterRequest:
    if isinstance(adapter, adapter_pb2.UndeployAdapterRequest):
        return adapter
    return adapter_pb2.UndeployAdapterRequest(adapter=resource_name("adapters", adapter))


def list_adapters(
    request: adapter_pb2.ListAdaptersRequest | None, *, page_size: int | None, page_token: str | None
) -> adapter_pb2.ListAdaptersRequest:
    return build(adapter_pb2.ListAdaptersRequest, request, {"page_size": page_size, "page_token": page_token})


# InferenceService


def chat_messages(messages: Iterable[MessageLike]) -> list[inference_pb2.ChatMessage]:
    """A chat's turns as ChatMessages; the server checks roles and order (INVALID_ARGUMENT names the message)."""
    built = []
    for message in messages:
        if isinstance(message, inference_pb2.ChatMessage):
            built.append(message)
        elif isinstance(message, Mapping):
            built.append(inference_pb2.ChatMessage(**message))
        elif isinstance(message, tuple) and len(message) == 2:
            built.append(inference_pb2.ChatMessage(role=message[0], content=message[1]))
        else:
            raise TypeError(f"a chat message is a ChatMessage, a (role, content) pair or a dict, got {message!r}")
    return built


def _generate(
    cls: type[M], prompt: str | M | None, messages: Iterable[MessageLike] | None, adapter: str | None, sampling: Any
) -> M:
    chat = chat_messages(messages) if messages is not None else None
    if isinstance(prompt, cls):
        return build(cls, prompt, {"adapter": adapter, "sampling": sampling, "messages": chat})
    return cls(
        prompt=prompt or "",
        messages=chat,
        adapter=adapter or "",
        sampling=_message(inference_pb2.SamplingParams, sampling),
    )


def generate(
    prompt: str | inference_pb2.GenerateRequest | None,
    *,
    messages: Iterable[MessageLike] | None,
    adapter: str | None,
    sampling: inference_pb2.SamplingParams | Mapping[str, Any] | None,
) -> inference_pb2.GenerateRequest:
    return _generate(inference_pb2.GenerateRequest, prompt, messages, adapter, sampling)


def generate_stream(
    prompt: str | inference_pb2.GenerateStreamRequest | None,
    *,
    messages: Iterable[MessageLike] | None,
    adapter: str | None,
    sampling: inference_pb2.SamplingParams | Mapping[str, Any] | None,
) -> inference_pb2.GenerateStreamRequest:
    return _generate(inference_pb2.GenerateStreamRequest, prompt, messages, adapter, sampling)
