"""LayerCardService: proto <-> domain conversion only."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from google.protobuf import duration_pb2, timestamp_pb2

from layercard.v1 import common_pb2, layer_card_pb2, layer_card_pb2_grpc
from layercard_service.api.paging import ProtoPage
from layercard_service.control.cards import CardProgress, CardService, StoredCard
from layercard_service.data.sources import DatasetRequest
from layercard_service.domain.cards import (
    CardDataset,
    CardSettings,
    CostCalibration,
    LayerCardData,
    PlacementTiming,
    performance_checkpoints,
)
from layercard_service.errors import InvalidArgument

__all__ = ["LayerCardServicer", "card_to_proto", "dataset_request", "settings_from_proto"]

_DEVICES = {common_pb2.DEVICE_UNSPECIFIED: "", common_pb2.DEVICE_CPU: "cpu", common_pb2.DEVICE_CUDA: "cuda"}
_PRECISIONS = {
    common_pb2.PRECISION_UNSPECIFIED: "",
    common_pb2.PRECISION_FLOAT32: "float32",
    common_pb2.PRECISION_BFLOAT16: "bfloat16",
    common_pb2.PRECISION_FLOAT16: "float16",
}


def dataset_request(source: common_pb2.DatasetSource) -> DatasetRequest:
    kind = source.WhichOneof("source")
    return DatasetRequest(
        builtin=source.builtin if kind == "builtin" else "",
        inline_jsonl=source.inline_jsonl if kind == "inline_jsonl" else None,
        path=source.path if kind == "path" else "",
        split=source.split,
    )


def settings_from_proto(request: layer_card_pb2.ComputeLayerCardRequest) -> CardSettings:
    """Unset (zero) fields take the documented defaults; out-of-range ones fail validation in CardSettings."""
    defaults = CardSettings()
    dropout = request.lora.dropout
    if not 0.0 <= dropout < 1.0:  # the card does not use dropout, but a value no job would accept is an error here too
        raise InvalidArgument.field("lora.dropout", f"must be in [0, 1), got {dropout}")
    return CardSettings(
        probe_size=request.probe_size if request.HasField("probe_size") else defaults.probe_size,
        rank=request.lora.rank if request.lora.HasField("rank") else defaults.rank,
        alpha=request.lora.alpha,
        target_modules=tuple(request.lora.target_modules),
        compute_coupling=request.compute_coupling,
        compute_performance=request.compute_performance,
        performance_steps=request.performance_steps or defaults.performance_steps,
        performance_learning_rates=tuple(request.performance_learning_rates),
        seed=request.seed,
        max_seq_len=request.max_seq_len if request.HasField("max_seq_len") else defaults.max_seq_len,
        device=_DEVICES.get(request.device, "?"),
        precision=_PRECISIONS.get(request.precision, "?"),
    )


def _settings_to_proto(model: str, settings: CardSettings) -> layer_card_pb2.ComputeLayerCardRequest:
    device = {v: k for k, v in _DEVICES.items()}[settings.device]
    precision = {v: k for k, v in _PRECISIONS.items()}[settings.precision]
    return layer_card_pb2.ComputeLayerCardRequest(
        model=model,
        probe_size=settings.probe_size,
        lora=common_pb2.LoraShape(
            rank=settings.rank, alpha=settings.lora_alpha, target_modules=list(settings.target_modules)
        ),
        compute_coupling=settings.compute_coupling,
        compute_performance=settings.compute_performance,
        performance_steps=settings.performance_steps,
        performance_learning_rates=list(settings.performance_learning_rates),
        device=device,
        precision=precision,
        seed=settings.seed,
        max_seq_len=settings.max_seq_len,
    )


def _dataset_to_proto(dataset: CardDataset) -> tuple[common_pb2.DatasetSource, layer_card_pb2.CardDataset]:
    """The request's DatasetSource as responses show it (inline bytes by hash), and the card's dataset record."""
    if dataset.kind == "builtin":
        request = common_pb2.DatasetSource(builtin=dataset.source, split=dataset.split)
        source = dataset.source
    elif dataset.kind == "inline":
        request = common_pb2.DatasetSource(
            inline_jsonl=b"", inline_jsonl_sha256=dataset.source, inline_jsonl_size_bytes=dataset.inline_size_bytes
        )
        source = f"inline:sha256:{dataset.source}"
    else:
        request = common_pb2.DatasetSource(path=dataset.source)
        source = dataset.source
    record = layer_card_pb2.CardDataset(
        source=source,
        split=dataset.split,
        fingerprint=dataset.fingerprint,
        examples_used=dataset.examples_used,
        examples_total=dataset.examples_total,
    )
    return request, record


def card_to_proto(stored: StoredCard) -> layer_card_pb2.LayerCard:
    card: LayerCardData = stored.card
    created = timestamp_pb2.Timestamp()
    created.FromNanoseconds(int(stored.create_time * 1e9))
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(card.compute_seconds * 1e9))
    message = layer_card_pb2.LayerCard(
        name=stored.name,
        model=card.model,
        architecture=card.architecture,
        num_layers=card.num_layers,
        num_parameters=card.num_parameters,
        fingerprint=stored.fingerprint,
        settings=_settings_to_proto(card.model, card.settings),
        create_time=created,
        compute_duration=duration,
        from_store=stored.from_store,
        probe_loss=card.probe_loss,
        probe_examples=card.probe_examples,
        probe_tokens=card.probe_tokens,
    )
    message.settings.lora.target_modules[:] = card.module_types
    if card.dataset is not None:
        request, record = _dataset_to_proto(card.dataset)
        message.settings.dataset.CopyFrom(request)
        message.dataset.CopyFrom(record)
    if any(row.measured_gain_curve for row in card.layers):
        message.performance_checkpoints.extend(performance_checkpoints(card.settings.performance_steps))
    for row in card.layers:
        layer = message.layers.add(
            index=row.index,
            resnorm_sq=row.resnorm_sq,
            resnorm_sq_split_half=row.resnorm_sq_split_half,
            resnorm_share=row.resnorm_share,
            predicted_gain=row.predicted_gain,
            activation_energy=row.activation_energy,
            effective_rank=row.effective_rank,
            condition_number=row.condition_number,
            forward_seconds=row.forward_seconds,
            backward_seconds=row.backward_seconds,
            activation_bytes=row.activation_bytes,
            adapter_parameters=row.adapter_parameters,
            adapter_bytes=row.adapter_bytes,
            peft_serving_overhead_ms_per_token=row.peft_serving_overhead_ms_per_token,
            residual_mean_square=row.residual_mean_square,
        )
        if row.measured_gain is not None:
            layer.measured_gain = row.measured_gain
        layer.measured_gain_curve.extend(row.measured_gain_curve)
        for m in row.modules:
            layer.modules.add(**vars(m))
    for pilot in card.learning_rate_pilots:
        message.learning_rate_pilots.add(learning_rate=pilot.learning_rate, gain_curve=pilot.gain_curve)
    if card.coupling is not None:
        message.coupling.size = len(card.coupling)
        message.coupling.values.extend(v for row in card.coupling for v in row)
    t = card.training_cost
    for index, layer in enumerate(message.layers):  # older cards lack some of these per-block lists: 0 there
        if index < min(len(t.forward_pass_seconds), len(t.backward_pass_seconds)):
            layer.pass_through_seconds = t.forward_pass_seconds[index] + t.backward_pass_seconds[index]
        if index < len(t.forward_nograd_seconds):
            layer.no_graph_seconds = t.forward_nograd_seconds[index]
        if index < len(t.pass_activation_bytes):
            layer.pass_through_activation_bytes = t.pass_activation_bytes[index]
    message.training_cost.CopyFrom(
        layer_card_pb2.TrainingCost(
            fixed_seconds=t.fixed_seconds,
            per_adapter_seconds=t.per_adapter_seconds,
            base_memory_bytes=t.base_memory_bytes,
            predicted_full_step_seconds=t.predicted_full_step_seconds,
            measured_full_step_seconds=t.measured_full_step_seconds,
            predicted_partial_step_seconds=t.predicted_partial_step_seconds,
            measured_partial_step_seconds=t.measured_partial_step_seconds,
            validation_layers=t.validation_layers,
            step_time_relative_error=t.step_time_relative_error,
            predicted_full_peak_memory_bytes=t.predicted_full_peak_memory_bytes,
            measured_full_peak_memory_bytes=t.measured_full_peak_memory_bytes,
            peak_memory_relative_error=t.peak_memory_relative_error,
            batch_size=t.batch_size,
            seq_len=t.seq_len,
            prefix_cache_bytes_per_token=t.prefix_cache_bytes_per_token,
        )
    )
    if t.calibration is not None:
        message.training_cost.calibration.CopyFrom(_calibration_to_proto(t.calibration))
    s = card.serving_cost
    message.serving_cost.peft_base_ms_per_token = s.peft_base_ms_per_token
    message.serving_cost.vllm_basis = s.vllm_basis
    if s.vllm_overhead_fraction is not None:
        message.serving_cost.vllm_overhead_fraction = s.vllm_overhead_fraction
    if s.vllm_base_ms_per_token is not None:
        message.serving_cost.vllm_base_ms_per_token = s.vllm_base_ms_per_token
    for pool in s.vllm_pools:
        message.serving_cost.vllm_pools.append(
            layer_card_pb2.VllmPoolCost(
                pool=pool.pool,
                lora_target_modules=pool.target_modules,
                max_lora_rank=pool.max_lora_rank,
                ranks=[
                    layer_card_pb2.VllmRankCost(
                        rank=r.rank,
                        overhead_fraction=r.overhead_fraction,
                        samples=r.samples,
                        basis=r.basis,
                        base_ms_per_token=r.base_ms_per_token,
                    )
                    for r in pool.ranks
                ],
            )
        )
    return message


def _calibration_to_proto(c: CostCalibration) -> layer_card_pb2.CostCalibration:
    def timing(t: PlacementTiming) -> layer_card_pb2.PlacementTiming:
        return layer_card_pb2.PlacementTiming(
            layers=t.layers,
            measured_step_seconds=t.measured_seconds,
            predicted_step_seconds=t.predicted_seconds,
            measured_peak_memory_bytes=t.measured_peak_memory_bytes,
            predicted_peak_memory_bytes=t.predicted_peak_memory_bytes,
        )

    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(c.seconds * 1e9))
    return layer_card_pb2.CostCalibration(
        method=c.method,
        rounds=c.rounds,
        measured_steps=c.measured_steps,
        duration=duration,
        graph_seconds_per_block=c.graph_seconds_per_block,
        adapter_seconds_per_block=c.adapter_seconds_per_block,
        fit_placements=[timing(t) for t in c.fit],
        held_out_placements=[timing(t) for t in c.held_out],
        step_error_p50=c.step_error_p50,
        step_error_p90=c.step_error_p90,
        memory_error_p50=c.memory_error_p50,
        memory_error_p90=c.memory_error_p90,
        notes=c.notes,
    )


def _progress_to_proto(event: CardProgress) -> layer_card_pb2.ComputeLayerCardResponse:
    progress = common_pb2.Progress(phase=event.phase, fraction=event.fraction, message=event.message)
    if event.eta_seconds is not None and math.isfinite(event.eta_seconds):
        progress.eta.FromNanoseconds(int(event.eta_seconds * 1e9))
    return layer_card_pb2.ComputeLayerCardResponse(progress=progress)


class LayerCardServicer(layer_card_pb2_grpc.LayerCardServiceServicer):
    def __init__(self, cards: CardService, serving: Callable[[LayerCardData], LayerCardData] = lambda c: c) -> None:
        self.cards = cards
        self.serving = serving  # the card with the serving fleet's measured vLLM figures, as the planner sees it

    def _proto(self, stored: StoredCard) -> layer_card_pb2.LayerCard:
        return card_to_proto(dataclasses.replace(stored, card=self.serving(stored.card)))

    async def ComputeLayerCard(self, request, context):
        events = self.cards.compute(
            request.model, dataset_request(request.dataset), settings_from_proto(request), force=request.force_recompute
        )
        try:
            async for event in events:
                if isinstance(event, CardProgress):
                    yield _progress_to_proto(event)
                else:
                    yield layer_card_pb2.ComputeLayerCardResponse(card=self._proto(event))
        finally:
            await events.aclose()  # on client cancel too: the domain sets its cancel flag

    async def GetLayerCard(self, request, context):
        return self._proto(self.cards.get(request.name))

    async def ListLayerCards(self, request, context):
        page = ProtoPage(self._proto)
        cards, token = self.cards.list(request.model, request.page_size, request.page_token, size_of=page.size_of)
        return layer_card_pb2.ListLayerCardsResponse(layer_cards=page.messages(cards), next_page_token=token)
