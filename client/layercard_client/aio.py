"""The asyncio client (``grpc.aio``): the same methods as ``LayercardClient``, awaited.

    from layercard_client.aio import AsyncLayercardClient

    async with AsyncLayercardClient("127.0.0.1:50051") as client:
        print(await client.health())
        async for event in client.watch_tuning_job("tuningJobs/abc"):
            ...

Create it inside a running event loop (gRPC binds the channel to it). Requests are built by the same
``builders`` as the sync client, channels by the same ``channel`` module: only the awaiting differs here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
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
    open_aio_channel,
    resolve_settings,
)
from layercard_client.client import Metadata, health_status_name, next_page
from layercard_client.errors import from_rpc_error

__all__ = ["AsyncLayercardClient", "AsyncResponseStream"]

T = TypeVar("T")


class AsyncResponseStream(Generic[T]):
    """A server stream: ``async for`` over it; ``cancel()`` (or leaving ``async with``) stops the RPC."""

    def __init__(self, call: Any, method: str) -> None:
        self._call = call
        self._method = method

    def __aiter__(self) -> AsyncResponseStream[T]:
        return self

    async def __anext__(self) -> T:
        try:
            message = await self._call.read()
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, self._method) from exc
        if message is grpc.aio.EOF:
            raise StopAsyncIteration
        return message

    def cancel(self) -> None:
        self._call.cancel()

    async def __aenter__(self) -> AsyncResponseStream[T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cancel()


class AsyncLayercardClient:
    """Asynchronous client of the layercard service; see ``LayercardClient`` for the arguments."""

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
        self._channel = open_aio_channel(self.settings)
        self._stubs = Stubs(self._channel)

    # plumbing

    def _metadata(self, metadata: Metadata | None) -> tuple[tuple[str, Any], ...]:
        return (*self.settings.call_metadata(), *(metadata or ()))

    async def _unary(self, rpc: str, request: Any, timeout: Timeout, metadata: Metadata | None) -> Any:
        call, method = self._stubs.resolve(rpc)
        try:
            return await call(request, timeout=self.settings.deadline(timeout), metadata=self._metadata(metadata))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, method) from exc

    def _stream(self, rpc: str, request: Any, timeout: Timeout, metadata: Metadata | None) -> AsyncResponseStream[Any]:
        call, method = self._stubs.resolve(rpc)
        deadline = self.settings.deadline(timeout, stream=True)
        return AsyncResponseStream(call(request, timeout=deadline, metadata=self._metadata(metadata)), method)

    @staticmethod
    async def _pages(fetch: Callable[[str], Awaitable[Any]], items: str) -> AsyncIterator[Any]:
        token = ""
        while True:
            page = await fetch(token)
            for item in getattr(page, items):
                yield item
            token = next_page(token, page.next_page_token)
            if not token:
                return

    # health

    async def health(self, service: str = "", *, timeout: Timeout = DEFAULT, wait_for_ready: bool = False) -> str:
        """The serving status name of the server ("") or one service; see ``LayercardClient.health``."""
        try:
            response = await self._stubs.health.Check(
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
    ) -> AsyncResponseStream[layer_card_pb2.ComputeLayerCardResponse]:
        built = builders.compute_layer_card(request, model=model, dataset=dataset, lora=lora, fields=fields)
        return self._stream("LayerCardService/ComputeLayerCard", built, timeout, metadata)

    async def get_layer_card(
        self,
        name: str | layer_card_pb2.GetLayerCardRequest,
        *,
        timeout: Timeout = DEFAULT,
        metadata: Metadata | None = None,
    ) -> layer_card_pb2.LayerCard:
        return await self._unary("LayerCardService/GetLayerCard", builders.get_layer_card(name), timeout, metadata)

    async def list_layer_cards(
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
        return await self._unary("LayerCardService/ListLayerCards", built, timeout, metadata)

    def iter_layer_cards(
        self,
        *,
        page_size: int | None = None,
        model: str | None = None,
        timeout: Timeout = DEFAULT,
        metadata: Metadata | None = None,
    ) -> AsyncIterator[layer_card_pb2.LayerCard]:
        return self._pages(
            lambda token: self.list_layer_cards(
                page_size=page_size, page_token=token, model=model, timeout=timeout, metadata=metadata
            ),
            "layer_cards",
        )

    # PlacementService

    async def plan_placement(
        self,
        request: placement_pb2.PlanPlacementRequest | str,
        *,
        objective: int | str | None = None,
        budget: placement_pb2.Budget | Mapping[str, Any] | None = None,
        timeout: Timeout = DEFAULT,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> placement_pb2.Placement:
        built = builders.plan_placement(request, objective=objective, budget_=budget, fields=fields)
        return await self._unary("PlacementService/PlanPlacement", built, timeout, metadata)

    # TuningService

    async def create_tuning_job(
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
        """Queues a job; retry-safe through the request_id the builder always sets (see ``builders``)."""
        built = builders.create_tuning_job(
            request, model=model, training_data=training_data, adapter_id=adapter_id, fields=fields
        )
        return await self._unary("TuningService/CreateTuningJob", built, timeout, metadata)

    async def get_tuning_job(
        self,
        name: str | tuning_pb2.GetTuningJobRequest,
        *,
        timeout: Timeout = DEFAULT,
        metadata: Metadata | None = None,
    ) -> tuning_pb2.TuningJob:
        return await self._unary("TuningService/GetTuningJob", builders.get_tuning_job(name), timeout, metadata)

    async def list_tuning_jobs(
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
        return await self._unary("TuningService/ListTuningJobs", built, timeout, metadata)

    def iter_tuning_jobs(
        self,
        *,
        page_size: int | None = None,
        states: Sequence[int | str] | None = None,
        timeout: Timeout = DEFAULT,
        metadata: Metadata | None = None,
    ) -> AsyncIterator[tuning_pb2.TuningJob]:
        return self._pages(
            lambda token: self.list_tuning_jobs(
                page_size=page_size, page_token=token, states=states, timeout=timeout, metadata=metadata
            ),
            "tuning_jobs",
        )

    async def cancel_tuning_job(
        self,
        name: str | tuning_pb2.CancelTuningJobRequest,
        *,
        timeout: Timeout = DEFAULT,
        metadata: Metadata | None = None,
    ) -> tuning_pb2.TuningJob:
        built = builders.cancel_tuning_job(name)
        return await self._unary("TuningService/CancelTuningJob", built, timeout, metadata)

    async def delete_tuning_job(
        self,
        name: str | tuning_pb2.DeleteTuningJobRequest,
        *,
        timeout: Timeout = DEFAULT,
        metadata: Metadata | None = None,
    ) -> None:
        """Deletes an ended job (its adapter versions stay); a queued or running one is FAILED_PRECONDITION."""
        await self._unary("TuningService/DeleteTuningJob", builders.delete_tuning_job(name), timeout, metadata)

    def watch_tuning_job(
        self,
        name: str | tuning_pb2.WatchTuningJobRequest,
        *,
        after_sequence: int | None = None,
        timeout: Timeout = DEFAULT,
        metadata: Metadata | None = None,
    ) -> AsyncResponseStream[tuning_pb2.TuningJobEvent]:
        built = builders.watch_tuning_job(name, after_sequence=after_sequence)
        return self._stream("TuningService/WatchTuningJob", built, timeout, metadata)

    # AdapterService

    async def deploy_adapter(
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
        return await self._unary("AdapterService/DeployAdapter", built, timeout, metadata)

    async def undeploy_adapter(
        self,
        adapter: str | adapter_pb2.UndeployAdapterRequest,
        *,
        timeout: Timeout = DEFAULT,
        metadata: Metadata | None = None,
    ) -> adapter_pb2.UndeployAdapterResponse:
        built = builders.undeploy_adapter(adapter)
        return await self._unary("AdapterService/UndeployAdapter", built, timeout, metadata)

    async def list_adapters(
        self,
        request: adapter_pb2.ListAdaptersRequest | None = None,
        *,
        page_size: int | None = None,
        page_token: str | None = None,
        timeout: Timeout = DEFAULT,
        metadata: Metadata | None = None,
    ) -> adapter_pb2.ListAdaptersResponse:
        built = builders.list_adapters(request, page_size=page_size, page_token=page_token)
        return await self._unary("AdapterService/ListAdapters", built, timeout, metadata)

    def iter_adapters(
        self, *, page_size: int | None = None, timeout: Timeout = DEFAULT, metadata: Metadata | None = None
    ) -> AsyncIterator[adapter_pb2.Adapter]:
        return self._pages(
            lambda token: self.list_adapters(page_size=page_size, page_token=token, timeout=timeout, metadata=metadata),
            "adapters",
        )

    # InferenceService

    async def generate(
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
        return await self._unary("InferenceService/Generate", built, timeout, metadata)

    def generate_stream(
        self,
        prompt: str | inference_pb2.GenerateStreamRequest | None = None,
        *,
        messages: Iterable[builders.MessageLike] | None = None,
        adapter: str | None = None,
        sampling: inference_pb2.SamplingParams | Mapping[str, Any] | None = None,
        timeout: Timeout = DEFAULT,
        metadata: Metadata | None = None,
    ) -> AsyncResponseStream[inference_pb2.GenerateStreamResponse]:
        built = builders.generate_stream(prompt, messages=messages, adapter=adapter, sampling=sampling)
        return self._stream("InferenceService/GenerateStream", built, timeout, metadata)

    # lifecycle

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncLayercardClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
