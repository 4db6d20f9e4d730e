"""LayerCardService over a real socket: streaming, the store, paging, bad inputs, cancel, admission control."""

from __future__ import annotations

import json
import shutil
import threading
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from support.server_thread import ServerThread

from layercard.v1 import common_pb2, layer_card_pb2, layer_card_pb2_grpc
from layercard_service.config import ServiceConfig
from layercard_service.models.builtin import builtin_model_path

SMALL = dict(probe_size=32, max_seq_len=48)  # a card in seconds on two cores


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("roots")
    models, data = base / "models", base / "data"
    models.mkdir()
    data.mkdir()
    # A corrupt model: a real config and tokenizer, garbage weights.
    broken = models / "broken"
    shutil.copytree(builtin_model_path("tiny"), broken)
    (broken / "model.safetensors").write_bytes(b"\x00not a safetensors file")
    lines = [
        json.dumps({"prompt": f"say {w}:", "completion": f" {w[::-1]}"})
        for w in ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")
    ]
    (data / "reverse.jsonl").write_text("\n".join(lines * 4) + "\n")
    return models, data


@pytest.fixture(scope="module")
def cards_server(roots, tmp_path_factory):
    models, data = roots
    config = ServiceConfig(
        port=0,
        log_format="text",
        data_dir=tmp_path_factory.mktemp("state"),
        model_roots=(models,),
        dataset_roots=(data,),
        max_concurrent_cards=1,
        card_queue_size=1,
    )
    with ServerThread(config) as running:
        with grpc.insecure_channel(running.address) as channel:
            running.stub = layer_card_pb2_grpc.LayerCardServiceStub(channel)
            running.health = health_pb2_grpc.HealthStub(channel)
            yield running


def request(**overrides) -> layer_card_pb2.ComputeLayerCardRequest:
    fields = dict(model="builtin:tiny", dataset=common_pb2.DatasetSource(builtin="builtin:cipher"), **SMALL)
    fields.update(overrides)
    return layer_card_pb2.ComputeLayerCardRequest(**fields)


def serving(server) -> bool:
    return (
        server.health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    )


def test_compute_streams_progress_then_card_and_stores_it(cards_server):
    events = list(cards_server.stub.ComputeLayerCard(request(), timeout=600))
    progress = [e.progress for e in events if e.HasField("progress")]
    assert events[-1].HasField("card") and all(not e.HasField("card") for e in events[:-1])
    assert progress and {p.phase for p in progress} >= {"load_model", "probe", "calibrate"}
    fractions = [p.fraction for p in progress]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    card = events[-1].card
    assert card.name.startswith("layerCards/") and not card.from_store
    assert card.num_layers == 8 and len(card.layers) == 8
    assert sum(layer.resnorm_share for layer in card.layers) == pytest.approx(1.0)
    assert card.settings.probe_size == 32 and card.settings.lora.rank == 8

    # The same request again: answered from the store, with no progress events and no computation.
    computations = cards_server.server.core.cards.computations_started
    again = list(cards_server.stub.ComputeLayerCard(request(), timeout=60))
    assert len(again) == 1 and again[0].card.from_store and again[0].card.name == card.name
    assert cards_server.server.core.cards.computations_started == computations
    stored = cards_server.stub.GetLayerCard(layer_card_pb2.GetLayerCardRequest(name=card.name), timeout=10)
    assert stored.fingerprint == card.fingerprint and list(stored.layers) == list(card.layers)


def test_list_pages_through_cards(cards_server):
    for seed in (1, 2):
        list(cards_server.stub.ComputeLayerCard(request(seed=seed), timeout=600))
    names, token = [], ""
    while True:
        page = cards_server.stub.ListLayerCards(
            layer_card_pb2.ListLayerCardsRequest(page_size=1, page_token=token, model="builtin:tiny"), timeout=10
        )
        names += [c.name for c in page.layer_cards]
        token = page.next_page_token
        if not token:
            break
    assert len(names) == len(set(names)) >= 2
    empty = cards_server.stub.ListLayerCards(layer_card_pb2.ListLayerCardsRequest(model="/nope"), timeout=10)
    assert len(empty.layer_cards) == 0


def test_dataset_from_path_and_inline(cards_server, roots):
    _, data = roots
    path = str(data / "reverse.jsonl")
    by_path = list(
        cards_server.stub.ComputeLayerCard(request(dataset=common_pb2.DatasetSource(path=path)), timeout=600)
    )[-1].card
    inline = list(
        cards_server.stub.ComputeLayerCard(
            request(dataset=common_pb2.DatasetSource(inline_jsonl=(data / "reverse.jsonl").read_bytes())), timeout=600
        )
    )[-1].card
    assert inline.fingerprint == by_path.fingerprint  # same content, same card
    assert inline.from_store


BAD = [
    ("unknown built-in model", dict(model="builtin:nope"), grpc.StatusCode.NOT_FOUND, "BUILTIN_MODEL_NOT_FOUND"),
    ("model path outside roots", dict(model="/etc"), grpc.StatusCode.PERMISSION_DENIED, "PATH_OUTSIDE_ROOTS"),
    ("relative model path", dict(model="models/x"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ("no model", dict(model=""), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    (
        "empty inline dataset",
        dict(dataset=common_pb2.DatasetSource(inline_jsonl=b"")),
        grpc.StatusCode.INVALID_ARGUMENT,
        None,
    ),
    (
        "malformed inline dataset",
        dict(dataset=common_pb2.DatasetSource(inline_jsonl=b'{"prompt": 3}\n')),
        grpc.StatusCode.INVALID_ARGUMENT,
        None,
    ),
    ("no dataset", dict(dataset=common_pb2.DatasetSource()), grpc.StatusCode.INVALID_ARGUMENT, None),
    (
        "unknown task",
        dict(dataset=common_pb2.DatasetSource(builtin="builtin:nope")),
        grpc.StatusCode.NOT_FOUND,
        "TASK_NOT_FOUND",
    ),
    (
        "dataset path outside roots",
        dict(dataset=common_pb2.DatasetSource(path="/etc/passwd")),
        grpc.StatusCode.PERMISSION_DENIED,
        "PATH_OUTSIDE_ROOTS",
    ),
    ("probe size 0", dict(probe_size=0), grpc.StatusCode.INVALID_ARGUMENT, None),
    ("huge probe size", dict(probe_size=10_000_000), grpc.StatusCode.INVALID_ARGUMENT, None),
    ("rank 0", dict(lora=common_pb2.LoraShape(rank=0)), grpc.StatusCode.INVALID_ARGUMENT, None),
    (
        "unknown target module",
        dict(lora=common_pb2.LoraShape(target_modules=["foo_proj"])),
        grpc.StatusCode.INVALID_ARGUMENT,
        None,
    ),
]


@pytest.mark.parametrize("label, overrides, code, reason", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_get_clear_errors(cards_server, label, overrides, code, reason):
    with pytest.raises(grpc.RpcError) as err:
        list(cards_server.stub.ComputeLayerCard(request(**overrides), timeout=120))
    assert err.value.code() == code, err.value.details()
    assert err.value.details()
    if reason:
        info = error_details_pb2.ErrorInfo()
        rpc_status.from_call(err.value).details[0].Unpack(info)
        assert info.reason == reason
    assert serving(cards_server)


def test_corrupt_weights_fail_cleanly(cards_server, roots):
    models, _ = roots
    with pytest.raises(grpc.RpcError) as err:
        list(cards_server.stub.ComputeLayerCard(request(model=str(models / "broken")), timeout=120))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot load model" in err.value.details()
    assert serving(cards_server)


def test_get_and_list_bad_inputs(cards_server):
    for name, code in (
        ("", grpc.StatusCode.INVALID_ARGUMENT),
        ("cards/x", grpc.StatusCode.INVALID_ARGUMENT),
        ("layerCards/doesnotexist", grpc.StatusCode.NOT_FOUND),
    ):
        with pytest.raises(grpc.RpcError) as err:
            cards_server.stub.GetLayerCard(layer_card_pb2.GetLayerCardRequest(name=name), timeout=10)
        assert err.value.code() == code
    for bad in (dict(page_token="garbage"), dict(page_size=-1)):
        with pytest.raises(grpc.RpcError) as err:
            cards_server.stub.ListLayerCards(layer_card_pb2.ListLayerCardsRequest(**bad), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert serving(cards_server)


def test_cancel_stops_the_work_and_queue_limits_admission(cards_server):
    service = cards_server.server.core.cards

    def long(seed: int) -> layer_card_pb2.ComputeLayerCardRequest:  # different seeds: identical ones would share
        return request(probe_size=512, max_seq_len=96, force_recompute=True, seed=seed)

    first = cards_server.stub.ComputeLayerCard(long(7), timeout=600)
    assert next(first).HasField("progress")  # running
    second = cards_server.stub.ComputeLayerCard(long(8), timeout=600)
    assert next(second).progress.phase == "queued"
    # One running and one waiting fill the queue: a third is refused, with a retry hint.
    with pytest.raises(grpc.RpcError) as err:
        list(cards_server.stub.ComputeLayerCard(long(9), timeout=60))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # A request identical to a running one joins it instead of being refused: admission counts it once.
    joined = cards_server.stub.ComputeLayerCard(long(7), timeout=600)
    assert next(joined).HasField("progress")
    # Health and other RPCs keep answering (within their deadlines) while a card computes.
    assert serving(cards_server)
    cards_server.stub.ListLayerCards(layer_card_pb2.ListLayerCardsRequest(), timeout=10)
    joined.cancel()
    first.cancel()
    second.cancel()
    deadline = time.monotonic() + 60
    while service.in_progress and time.monotonic() < deadline:  # the workers notice the cancel between batches
        time.sleep(0.2)
    assert service.in_progress == 0
    assert serving(cards_server)


def test_card_from_several_threads_shares_the_store(cards_server):
    service, results = cards_server.server.core.cards, []
    computations = service.computations_started

    def call():
        results.append(list(cards_server.stub.ComputeLayerCard(request(seed=11), timeout=600))[-1].card.name)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    # Concurrent, they shared one computation; one after the other, the second came from the store.
    assert service.computations_started == computations + 1


def test_a_card_shows_the_serving_fleets_measured_vllm_figures(cards_server):
    """Before any deploy the card says vLLM's overhead is unmeasured; after one it shows what the planner uses."""
    from layercard_service.persistence.deployments import LatencyMeasurement, ServingShape

    card = list(cards_server.stub.ComputeLayerCard(request(), timeout=600))[-1].card
    get = layer_card_pb2.GetLayerCardRequest(name=card.name)
    before = cards_server.stub.GetLayerCard(get, timeout=10).serving_cost
    assert not before.HasField("vllm_overhead_fraction") and not before.HasField("vllm_base_ms_per_token")
    assert "not measured yet" in before.vllm_basis
    [pool] = before.vllm_pools  # the one pool this service has, as configured: nothing measured on it yet
    assert (pool.pool, list(pool.lora_target_modules), pool.max_lora_rank, list(pool.ranks)) == ("default", [], 16, [])

    store = cards_server.server.core.adapters.store  # a deploy's probe, as the deploy records it
    probe = LatencyMeasurement("http://vllm:8000", 40.0, 44.0, 2.5, 3.0, 0.2, 5, 120.0, 144.0, 32)
    store.add_measurement(ServingShape("builtin:tiny", (), 8, 8), "bot", 1, probe)
    after = cards_server.stub.GetLayerCard(get, timeout=10).serving_cost
    assert after.vllm_overhead_fraction == pytest.approx(0.2) and after.vllm_base_ms_per_token == pytest.approx(2.5)
    assert "post-deploy probes" in after.vllm_basis
    listed = cards_server.stub.ListLayerCards(layer_card_pb2.ListLayerCardsRequest(), timeout=10).layer_cards
    assert all(c.serving_cost.vllm_overhead_fraction == pytest.approx(0.2) for c in listed)
    assert not after.vllm_pools[0].ranks  # that probe was of servers at max rank 8, not this pool's 16
    store.add_measurement(ServingShape("builtin:tiny", (), 16, 8), "bot", 2, probe)
    [rank] = cards_server.stub.GetLayerCard(get, timeout=10).serving_cost.vllm_pools[0].ranks
    assert (rank.rank, rank.samples) == (8, 1) and rank.overhead_fraction == pytest.approx(0.2)
    assert rank.base_ms_per_token == pytest.approx(2.5) and "rank-8" in rank.basis
