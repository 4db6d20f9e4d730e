"""The synchronous client: one typed method per RPC, returning the proto messages.

    from layercard_client import LayercardClient

    with LayercardClient("127.0.0.1:50051", token="...") as client:
        print(client.health())                        # "SERVING"
        for event in client.compute_layer_card(model="builtin:tiny", dataset="builtin:cipher"):
            ...                                       # progress events, then the card
        for job in client.iter_tuning_jobs(states=["running"]):
            print(job.name, job.step, job.total_steps)
        answer = client.generate(messages=[("user", "What is 2+2?")], adapter="support-bot")  # in the chat template

Each method takes the request message or keyword arguments (see ``builders``), plus ``timeout`` (seconds;
None for no deadline; default from the settings) and extra ``metadata``. Failures raise a subclass of
``LayercardClientError``; UNAVAILABLE is retried first on idempotent methods (see ``channel``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
from grpc_health.v1 import health_pb2

from layercard.v1 import (
    adapter_pb2,
    common_pb2,
    inference_pb2,
    layer_card_pb2,
    placement_pb2,
    tuning_pb2,
)
from layercard_client import builders
from layercard_client.builders import DatasetLike
from layercard_client.channel import (
    DEFAULT,
    ClientSettings,
    RetryPolicy,
    Stubs,
    Timeout,
    open_channel,
    resolve_settings,
)
from layercard_client.errors import LayercardClientError, from_rpc_error

__all__ = ["LayercardClient", "ResponseStream", "health_status_name", "next_page"]

T = TypeVar("T")
Metadata = Sequence[tuple[str, str | bytes]]


def health_status_name(response: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def next_page(previous: str, token: str) -> str:
    """The token to fetch next, or "" at the end; a server repeating a token would otherwise loop forever."""
    if token and token == previous:
        raise LayercardClientError(
            f"the server returned the same page token twice ({token!r})", code=grpc.StatusCode.INTERNAL
        )
    return token


class ResponseStream(Generic[T]):
    """A server stream: iterate it for the messages; ``cancel()`` (or leaving ``with``) stops the RPC.

    Errors while reading surface as ``LayercardClientError`` subclasses, like those of unary calls.
    """

    def __init__(self, call: Any, method: str) -> None:
        self._call = call
        self._method = method

    def __iter__(self) -> ResponseStream[T]:
        return self

    def __next__(self) -> T:
        try:
            return next(self._call)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self._method) from exc

    def cancel(self) -> None:
        self._call.cancel()

    def __enter__(self) -> ResponseStream[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()  # a no-op once the stream has ended


class LayercardClient:
    """Blocking client of the layercard service. Thread-safe: one instance may serve many threads.

    Pass ``settings`` for full control; the keyword shortcuts (address, token, ...) override its fields.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        token: str | None = None,
        tls: bool | None = None,
        ca_file: str | Path | None = None,
        timeout: float | object | None = DEFAULT,
        retry: RetryPolicy | object | None = DEFAULT,
        settings: ClientSettings | None = None,
    ) -> None:
        self.settings = resolve_settings(
            settings, address=address, token=token, tls=tls, ca_file=ca_file, timeout=timeout, retry=retry
        )
        self._channel = open_channel(self.settings)
        self._stubs = Stubs(self._channel)

    # plumbing

    def _metadata(self, metadata: Metadata | None) -> tuple[tuple[str, Any], ...]:
        return (*self.settings.call_metadata(), *(metadata or ()))

    def _unary(self, rpc: str, request: Any, timeout: Timeout, metadata: Metadata | None) -> Any:
        call, method = self._stubs.resolve(rpc)
        try:
            return call(request, timeout=self.settings.deadline(timeout), metadata=self._metadata(metadata))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, method) from exc

    def _stream(self, rpc: str, request: Any, timeout: Timeout, metadata: Metadata | None) -> ResponseStream[Any]:
        call, method = self._stubs.resolve(rpc)
        deadline = self.settings.deadline(timeout, stream=True)
        return ResponseStream(call(request, timeout=deadline, metadata=self._metadata(metadata)), method)

    @staticmethod
    def _pages(fetch: Callable[[str], Any], items: str) -> Iterator[Any]:
        token = ""
        while True:
            page = fetch(token)
            yield from getattr(page, items)
            token = next_page(token, page.next_page_token)
            if not token:
                return

    # health

    def health(self, service: str = "", *, timeout: Timeout = DEFAULT, wait_for_ready: bool = False) -> str:
        """The serving status name ("SERVING", "NOT_SERVING", ...) of the server ("") or one service.

        ``wait_for_ready`` waits (up to the deadline) for the server to become reachable instead of failing
        fast with UNAVAILABLE. Health needs no token, so probes work on servers with auth.
        """
        try:
            response = self._stubs.health.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=self.settings.deadline(timeout),
                metadata=self._metadata(None),
                wait_for_ready=wait_for_ready,
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, "/grpc.health.v1.Health/Check") from exc
        return health_status_name(response)

    # LayerCardService

    def compute_layer_card(
        self,
        request: layer_card_pb2.ComputeLayerCardRequest | None = None,
        *,
        model: str | None = None,
        dataset: DatasetLike | None = None,
        lora: common_pb2.LoraShape | Mapping[str, Any] | None = None,
        timeout: Timeout = DEFAULT,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> ResponseStream[layer_card_pb2.ComputeLayerCardResponse]:
        """Streams progress events, then the card as the last message. Not retried: see ``IDEMPOTENT_METHODS``."""
        built = builders.compute_layer_card(request, model=model, dataset=dataset, lora=lora, fields=fields)
        return self._stream("LayerCardService/ComputeLayerCard", built, timeout, metadata)

    def get_layer_card(
        self,
        name: str | layer_card_pb2.GetLayerCardRequest,
        *,
        timeout: Timeout = DEFAULT,
        metadata: Metadata | None = None,
    ) -> layer_card_pb2.LayerCard:
        return self._unary("LayerCardService/GetLayerCard", builders.get_layer_card(name), timeout, metadata)

    def list_layer_cards(
        self,
        request: layer_card_pb2.ListLayerCardsRequest | None = None,
        *,
        page_size: int | None = None,
        page_token: str | None = None,
        model: str | None = None,
        timeout: Timeout = DEFAULT,
        metadata: Metadata | None = None,
    ) -> layer_card_pb2.ListLayerCardsResponse:
        built = builders.list_layer_cards(request, page_size=page_size, page_token=page_token, model=model)
        return self._unary("LayerCardService/ListLayerCards", built, timeout, metadata)

    def iter_layer_cards(
        self,
        *,
        page_size: int | None = None,
        model: str | None = None,
        timeout: Timeout = DEFAULT,
        metadata: Metadata | None = None,
    ) -> Iterator[layer_card_pb2.LayerCard]:
        """Every stored card, newest first, fetching pages as needed; ``timeout`` applies per page."""
        return self._pages(
            lambda token: self.list_layer_cards(
                page_size=page_size, page_token=token, model=model, timeout=timeout, metadata=metadata
            ),
            "layer_cards",
        )

    # PlacementService

    def plan_placement(
        self,
        request: placement_pb2.PlanPlacementRequest | str,
        *,
        objective: int | str | None = None,
        budget: placement_pb2.Budget | Mapping[str, Any] | None = None,
        timeout: Timeout = DEFAULT,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> placement_pb2.Placement:
        """``request`` is the message or the card's name; budget fields as in ``Budget`` (a dict is fine)."""
        built = builders.plan_placement(request, objective=objective, budget_=budget, fields=fields)
        return self._unary("PlacementService/PlanPlacement", built, timeout, metadata)

    # TuningService

    def create_tuning_job(
        self,
        request: tuning_pb2.CreateTuningJobRequest | None = None,
        *,
        model: str | None = None,
        training_data: DatasetLike | None = None,
        adapter_id: str | None = None,
        timeout: Timeout = DEFAULT,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> tuning_pb2.TuningJob:
        """Queues a job. Safe to retry: the request always carries a request_id (a uuid4 unless given),
        and the server answers a repeated request_id with the job it created the first time."""
        built = builders.create_tuning_job(
            request, model=model, training_data=training_data, adapter_id=adapter_id, fields=fields
        )
        return self._unary("TuningService/CreateTuningJob", built, timeout, metadata)

    def get_tuning_job(
        self,
        name: str | tuning_pb2.GetTuningJobRequest,
        *,
        timeout: Timeout = DEFAULT,
        metadata: Metadata | None = None,
    ) -> tuning_pb2.TuningJob:
        return self._unary("TuningService/GetTuningJob", builders.get_tuning_job(name), timeout, metadata)

    def list_tuning_jobs(
        self,
        request: tuning_pb2.ListTuningJobsRequest | None = None,
        *,
        page_size: int | None = None,
        page_token: str | None = None,
        states: Sequence[int | str] | None = None,
        timeout: Timeout = DEFAULT,
        metadata: Metadata | None = None,
    ) -> tuning_pb2.ListTuningJobsResponse:
        built = builders.list_tuning_jobs(request, page_size=page_size, page_token=page_token, states=states)
        return self._unary("TuningService/ListTuningJobs", built, timeout, metadata)

    def iter_tuning_jobs(
        self,
        *,
        page_size: int | None = None,
        states: Sequence[int | str] | None = None,
        timeout: Timeout = DEFAULT,
        metadata: Metadata | None = None,
    ) -> Iterator[tuning_pb2.TuningJob]:
        return self._pages(
            lambda token: self.list_tuning_jobs(
                page_size=page_size, page_token=token, states=states, timeout=timeout, metadata=metadata
            ),
            "tuning_jobs",
        )

    def cancel_tuning_job(
        self,
        name: str | tuning_pb2.CancelTuningJobRequest,
        *,
        timeout: Timeout = DEFAULT,
        metadata: Metadata | None = None,
    ) -> tuning_pb2.TuningJob:
        return self._unary("TuningService/CancelTuningJob", builders.cancel_tuning_job(name), timeout, metadata)

    def delete_tuning_job(
        self,
        name: str | tuning_pb2.DeleteTuningJobRequest,
        *,
        timeout: Timeout = DEFAULT,
        metadata: Metadata | None = None,
    ) -> None:
        """Deletes an ended job (its adapter versions stay); a queued or running one is FAILED_PRECONDITION."""
        self._unary("TuningService/DeleteTuningJob", builders.delete_tuning_job(name), timeout, metadata)

    def watch_tuning_job(
        self,
        name: str | tuning_pb2.WatchTuningJobRequest,
        *,
        after_sequence: int | None = None,
        timeout: Timeout = DEFAULT,
        metadata: Metadata | None = None,
    ) -> ResponseStream[tuning_pb2.TuningJobEvent]:
        """The job's events, history first, until it ends. To resume, pass the last ``sequence`` seen."""
        built = builders.watch_tuning_job(name, after_sequence=after_sequence)
        return self._stream("TuningService/WatchTuningJob", built, timeout, metadata)

    # AdapterService

    def deploy_adapter(
        self,
        adapter: str | adapter_pb2.DeployAdapterRequest,
        *,
        version: int | None = None,
        max_overhead_fraction: float | None = None,
        force: bool | None = None,
        validate_only: bool | None = None,
        full_latency_probe: bool | None = None,
        rollback_over_budget: bool | None = None,
        pool: str | None = None,
        timeout: Timeout = DEFAULT,
        metadata: Metadata | None = None,
    ) -> adapter_pb2.Deployment:
        fields = {
            "version": version,
            "max_overhead_fraction": max_overhead_fraction,
            "force": force,
            "validate_only": validate_only,
            "full_latency_probe": full_latency_probe,
            "rollback_over_budget": rollback_over_budget,
            "pool": pool,
        }
        built = builders.deploy_adapter(adapter, fields=fields)
        return self._unary("AdapterService/DeployAdapter", built, timeout, metadata)

    def undeploy_adapter(
        self,
        adapter: str | adapter_pb2.UndeployAdapterRequest,
        *,
        timeout: Timeout = DEFAULT,
        metadata: Metadata | None = None,
    ) -> adapter_pb2.UndeployAdapterResponse:
        return self._unary("AdapterService/UndeployAdapter", builders.undeploy_adapter(adapter), timeout, metadata)

    def list_adapters(
        self,
        request: adapter_pb2.ListAdaptersRequest | None = None,
        *,
        page_size: int | None = None,
        page_token: str | None = None,
        timeout: Timeout = DEFAULT,
        metadata: Metadata | None = None,
    ) -> adapter_pb2.ListAdaptersResponse:
        built = builders.list_adapters(request, page_size=page_size, page_token=page_token)
        return self._unary("AdapterService/ListAdapters", built, timeout, metadata)

    def iter_adapters(
        self, *, page_size: int | None = None, timeout: Timeout = DEFAULT, metadata: Metadata | None = None
    ) -> Iterator[adapter_pb2.Adapter]:
        return self._pages(
            lambda token: self.list_adapters(page_size=page_size, page_token=token, timeout=timeout, metadata=metadata),
            "adapters",
        )

    # InferenceService

    def generate(
        self,
        prompt: str | inference_pb2.GenerateRequest | None = None,
        *,
        messages: Iterable[builders.MessageLike] | None = None,
        adapter: str | None = None,
        sampling: inference_pb2.SamplingParams | Mapping[str, Any] | None = None,
        timeout: Timeout = DEFAULT,
        metadata: Metadata | None = None,
    ) -> inference_pb2.GenerateResponse:
        built = builders.generate(prompt, messages=messages, adapter=adapter, sampling=sampling)
        return self._unary("InferenceService/Generate", built, timeout, metadata)

    def generate_stream(
        self,
        prompt: str | inference_pb2.GenerateStreamRequest | None = None,
        *,
        messages: Iterable[builders.MessageLike] | None = None,
        adapter: str | None = None,
        sampling: inference_pb2.SamplingParams | Mapping[str, Any] | None = None,
        timeout: Timeout = DEFAULT,
        metadata: Metadata | None = None,
    ) -> ResponseStream[inference_pb2.GenerateStreamResponse]:
        built = builders.generate_stream(prompt, messages=messages, adapter=adapter, sampling=sampling)
        return self._stream("InferenceService/GenerateStream", built, timeout, metadata)

    # lifecycle

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> LayercardClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
