"""The server the gRPC fuzz runs against, and what must survive it (tests/support/grpc_fuzz.py drives it).

One real server over a socket, with a dataset root holding small real datasets (good, bad, NaN, deep, a symlink
out of the root), a model root with broken models, two published adapter versions, and a vLLM URL on a closed
port. Before the fuzz it gets a card, a long-running job and spare jobs; after it they must still be there.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf.message import Message

from layercard.v1 import (
    adapter_pb2,
    adapter_pb2_grpc,
    common_pb2,
    layer_card_pb2,
    layer_card_pb2_grpc,
    placement_pb2,
    placement_pb2_grpc,
    tuning_pb2,
    tuning_pb2_grpc,
)
from layercard_service.config import ServiceConfig
from layercard_service.serving.vllm_process import free_port
from support.server_thread import ServerThread

__all__ = [
    "CHANNEL_OPTIONS",
    "TRAIN_JSONL",
    "FuzzEnv",
    "check_resources",
    "fuzz_server",
    "hyperparameters",
    "job_request",
    "list_sizes",
]

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 2**20), ("grpc.max_send_message_length", 64 * 2**20)]
TRAIN_JSONL = "".join(json.dumps({"prompt": f"word {i}:", "completion": f" w{i}"}) + "\n" for i in range(16))


@dataclass
class FuzzEnv:
    """The server's folders and the names of the resources seeded before the fuzz."""

    root: Path
    card: str = ""
    fingerprint: str = ""
    job: str = ""  # long-running; no fuzzed request can name it (it must outlive the fuzz)
    spare_jobs: dict[str, str] = field(default_factory=dict)  # per RPC: a job the fuzz may cancel or delete
    adapters: tuple[str, ...] = ("adapters/echo", "adapters/spare")

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def data_dir(self) -> Path:
        return self.root / "state"

    def strings(self) -> list[str]:
        """Strings the fuzz mixes in: paths under (and around) the roots, and names of what exists."""
        d, m = str(self.datasets), str(self.models)
        paths = [f"{d}/train.jsonl", f"{d}/train.jsonl\n", f"{d}/train.jsonl\x00x", f"{d}/../state/state.db"]
        paths += [f"{d}/{name}" for name in ("bad.jsonl", "nan.jsonl", "deep.jsonl", "empty.jsonl", "escape.jsonl")]
        paths += [d, f"{d}/", f"{d}/sub", f"{d}/missing.jsonl", f"{d}/sub/../train.jsonl", "train.jsonl"]
        paths += [m, f"{m}/garbage", f"{m}/empty", f"{m}/weights-only", f"{m}/missing", f"{m}/../datasets"]
        names = [self.card, self.card + "\n", self.card + "/x", self.card.upper(), *self.spare_jobs.values()]
        names += [n + suffix for n in self.adapters for suffix in ("", "\n", "/versions/1", "@v1")]
        return paths + names + ["echo", "spare", "echo@v1", "builtin-tiny"]


def _prepare(root: Path) -> FuzzEnv:
    env = FuzzEnv(root)
    env.datasets.mkdir(parents=True)
    (env.datasets / "train.jsonl").write_text(TRAIN_JSONL)
    (env.datasets / "bad.jsonl").write_text('{"prompt": "only a prompt"}\n')
    (env.datasets / "nan.jsonl").write_text('{"prompt": NaN, "completion": Infinity}\n')
    (env.datasets / "deep.jsonl").write_text("[" * 200_000 + "]" * 200_000 + "\n")
    (env.datasets / "empty.jsonl").write_text("")
    (env.datasets / "sub").mkdir()
    (env.datasets / "escape.jsonl").symlink_to("/etc/hostname")  # inside the root by name, outside by target
    for name in ("garbage", "empty", "weights-only"):
        (env.models / name).mkdir(parents=True)
    (env.models / "garbage" / "config.json").write_text("{not json")
    (env.models / "weights-only" / "model.safetensors").write_bytes(b"\x00" * 64)
    env.data_dir.mkdir()
    from support.adapters import publish_version  # imports torch: only when a server is made

    adapter = root / "adapter-files"
    adapter.mkdir()
    config = {"r": 8, "peft_type": "LORA", "target_modules": ["o_proj"], "bias": "none"}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    for name in env.adapters:
        publish_version(env.data_dir, name.split("/")[1], adapter)
    return env


def _config(env: FuzzEnv) -> ServiceConfig:
    return ServiceConfig(
        port=0,
        log_format="text",
        log_level="ERROR",
        data_dir=env.data_dir,
        dataset_roots=(env.datasets,),
        model_roots=(env.models,),
        vllm_urls=(f"http://127.0.0.1:{free_port()}",),  # a closed port: inference and deploys reach the fleet code
        vllm_model="builtin:tiny",
        reconcile_interval_seconds=60.0,
        max_concurrent_jobs=1,
        job_threads=1,
        card_queue_size=2,
    )


def hyperparameters(steps: int) -> tuning_pb2.Hyperparameters:
    return tuning_pb2.Hyperparameters(steps=steps, batch_size=4, max_seq_len=32, checkpoint_interval=1000)


def job_request(adapter_id: str, steps: int) -> tuning_pb2.CreateTuningJobRequest:
    return tuning_pb2.CreateTuningJobRequest(
        model="builtin:tiny",
        training_data=common_pb2.DatasetSource(builtin="builtin:cipher"),
        validation_data=common_pb2.DatasetSource(inline_jsonl=TRAIN_JSONL.encode()),
        explicit_layers=tuning_pb2.ExplicitLayers(layers=[6, 7], lora=common_pb2.LoraShape(rank=4)),
        hyperparameters=hyperparameters(steps),
        adapter_id=adapter_id,
    )


def _seed(channel: grpc.Channel, env: FuzzEnv) -> None:
    """One card (probe of 8) and jobs: a long one that keeps the one job slot busy, so that jobs the fuzz creates
    queue (and are cancelled at once) instead of each starting a worker, and spares the fuzz may cancel or delete."""
    compute = layer_card_pb2.ComputeLayerCardRequest(
        model="builtin:tiny", dataset=common_pb2.DatasetSource(builtin="builtin:cipher"), probe_size=8, max_seq_len=32
    )
    card = list(layer_card_pb2_grpc.LayerCardServiceStub(channel).ComputeLayerCard(compute, timeout=600))[-1].card
    env.card, env.fingerprint = card.name, card.fingerprint
    tuning = tuning_pb2_grpc.TuningServiceStub(channel)
    env.job = tuning.CreateTuningJob(job_request("seeded", 1_000_000), timeout=60).name
    for rpc in ("CancelTuningJob", "DeleteTuningJob"):
        env.spare_jobs[rpc] = tuning.CreateTuningJob(job_request("spare-job", 5), timeout=60).name


@contextlib.contextmanager
def fuzz_server(root: Path | None = None) -> Iterator[tuple[ServerThread, grpc.Channel, FuzzEnv]]:
    """A real server over a socket with a dataset root, a model root, adapter versions and seeded resources."""
    with contextlib.ExitStack() as stack:
        if root is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="layercard-fuzz-")))
        env = _prepare(root)
        server = stack.enter_context(ServerThread(_config(env)))
        channel = stack.enter_context(grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS))
        _seed(channel, env)
        yield server, channel, env


def _all_pages(list_call, request: Message, items: str) -> list[Message]:
    found, token = [], ""
    for _ in range(1000):
        request.page_token = token
        reply = list_call(request, timeout=60)
        found += list(getattr(reply, items))
        token = reply.next_page_token
        if not token:
            break
    return found


def check_resources(channel: grpc.Channel, env: FuzzEnv) -> list[str]:
    """What the seeded resources should still be after the fuzz: problems found, [] when all is well."""
    problems = []
    cards = layer_card_pb2_grpc.LayerCardServiceStub(channel)
    tuning = tuning_pb2_grpc.TuningServiceStub(channel)
    try:
        card = cards.GetLayerCard(layer_card_pb2.GetLayerCardRequest(name=env.card), timeout=30)
        if card.fingerprint != env.fingerprint:
            problems.append(f"card {env.card} changed fingerprint")
        listed = _all_pages(cards.ListLayerCards, layer_card_pb2.ListLayerCardsRequest(page_size=100), "layer_cards")
        if env.card not in [c.name for c in listed]:
            problems.append(f"card {env.card} not listed")
        plan = placement_pb2.PlanPlacementRequest(layer_card=env.card, objective=placement_pb2.OBJECTIVE_FIXED_K, k=2)
        if len(placement_pb2_grpc.PlacementServiceStub(channel).PlanPlacement(plan, timeout=30).layers) != 2:
            problems.append("the seeded card no longer plans")
        job = tuning.GetTuningJob(tuning_pb2.GetTuningJobRequest(name=env.job), timeout=30)
        if job.state != tuning_pb2.TUNING_JOB_STATE_RUNNING:
            problems.append(f"seeded job {env.job} is {tuning_pb2.TuningJobState.Name(job.state)}, not RUNNING")
        jobs = _all_pages(tuning.ListTuningJobs, tuning_pb2.ListTuningJobsRequest(page_size=100), "tuning_jobs")
        if env.job not in [j.name for j in jobs]:
            problems.append(f"job {env.job} not listed")
        listing = adapter_pb2_grpc.AdapterServiceStub(channel).ListAdapters(
            adapter_pb2.ListAdaptersRequest(), timeout=30
        )
        missing = set(env.adapters) - {a.name for a in listing.adapters}
        if missing:
            problems.append(f"adapters {sorted(missing)} not listed")
    except grpc.RpcError as err:
        problems.append(f"{err.code().name}: {err.details()}")
    return problems


def list_sizes(channel: grpc.Channel) -> dict[str, int]:
    """Serialized bytes of each List RPC's largest page (page_size 1000): what a caller must be able to receive."""
    calls = {
        "ListLayerCards": lambda: layer_card_pb2_grpc.LayerCardServiceStub(channel).ListLayerCards(
            layer_card_pb2.ListLayerCardsRequest(page_size=1000), timeout=120
        ),
        "ListTuningJobs": lambda: tuning_pb2_grpc.TuningServiceStub(channel).ListTuningJobs(
            tuning_pb2.ListTuningJobsRequest(page_size=1000), timeout=120
        ),
        "ListAdapters": lambda: adapter_pb2_grpc.AdapterServiceStub(channel).ListAdapters(
            adapter_pb2.ListAdaptersRequest(page_size=1000), timeout=120
        ),
    }
    sizes = {}
    for name, list_call in calls.items():
        try:
            sizes[name] = list_call().ByteSize()
        except grpc.RpcError as err:  # e.g. larger than the 64 MiB the channel accepts
            sizes[name] = -1
            sizes[f"{name}_error"] = err.code().name  # type: ignore[assignment]
    return sizes
