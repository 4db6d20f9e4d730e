"""The gRPC fuzz driver shared by tests/integration/test_fuzz_grpc.py and ``make bench BENCH=hardening``.

Every RPC of the five public services is a ``Target`` found from the proto descriptors. Its requests: a boundary
corpus (each field a valid request sets, at its classic edge cases), then hypothesis's draws from the generic
message strategy and from valid requests with one field changed (tests/support/proto_strategies.py). Each call
goes to one real server (tests/support/fuzz_server.py) over a socket; after each one the properties hold:
- the status is never INTERNAL or UNKNOWN, nor DEADLINE_EXCEEDED on a cheap call (that is a hang);
- an error's trailer fits the client's metadata limit (else the caller sees RESOURCE_EXHAUSTED, not the error);
- a successful reply names what it made as AIP-122 spells ids (a name that does not round-trip is a bug);
- health still says SERVING.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import duration_pb2, message_factory, text_format
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from layercard.v1 import adapter_pb2, common_pb2, inference_pb2, layer_card_pb2, placement_pb2, tuning_pb2
from support.fuzz_server import TRAIN_JSONL, FuzzEnv, hyperparameters, job_request
from support.proto_strategies import boundary_corpus, messages, near_valid

__all__ = [
    "EXAMPLES_DEFAULT",
    "EXAMPLES_PER_RPC",
    "IncidentLog",
    "Tally",
    "Target",
    "call",
    "run_target",
    "serving",
    "targets",
]

BAD = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
CHEAP_DEADLINE_S, EXPENSIVE_DEADLINE_S = 20.0, 2.0
# Calls that may legitimately outlast a short deadline: computing, training, streaming, talking to vLLM.
EXPENSIVE = frozenset(
    {"ComputeLayerCard", "WatchTuningJob", "DeployAdapter", "UndeployAdapter", "Generate", "GenerateStream"}
)
# Examples per RPC in CI (the bench multiplies them): at least 2,000 in all, the whole fuzz within minutes. Calls
# that reach the (unreachable) fleet cost 0.6 s each in the client's connection retries: fewer of those.
EXAMPLES_DEFAULT = 250
EXAMPLES_PER_RPC = {
    "ComputeLayerCard": 60,
    "WatchTuningJob": 80,
    **dict.fromkeys(("DeployAdapter", "ListAdapters", "Generate", "GenerateStream"), 40),
}
_MODULES = (layer_card_pb2, placement_pb2, tuning_pb2, adapter_pb2, inference_pb2)


@dataclass(frozen=True)
class Target:
    service: str  # full name, "layercard.v1.TuningService"
    method: str
    request_type: type[Message]
    response_type: type[Message]
    stream: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.method}"

    @property
    def deadline(self) -> float:
        if self.method == "WatchTuningJob":  # a watch past the last event waits for the next one: by design
            return 1.0
        return EXPENSIVE_DEADLINE_S if self.method in EXPENSIVE else CHEAP_DEADLINE_S


def targets() -> list[Target]:
    """Every RPC of the five services, from their descriptors (an RPC added to a proto is fuzzed too)."""
    found = []
    for module in _MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                found.append(
                    Target(
                        service.full_name,
                        method.name,
                        message_factory.GetMessageClass(method.input_type),
                        message_factory.GetMessageClass(method.output_type),
                        method.server_streaming,
                    )
                )
    return found


def _job(
    adapter_id: str, steps: int, source: common_pb2.DatasetSource | None = None
) -> tuning_pb2.CreateTuningJobRequest:
    request = job_request(adapter_id, steps)
    if source is not None:
        request.training_data.CopyFrom(source)
    return request


def _valid(target: Target, env: FuzzEnv) -> list[Message]:
    """Requests that pass validation, for the near-valid strategy to change one field of."""
    r = target.request_type
    path = common_pb2.DatasetSource(path=f"{env.datasets}/train.jsonl")
    inline = common_pb2.DatasetSource(inline_jsonl=TRAIN_JSONL.encode())
    budget = tuning_pb2.CardBudget(layer_card=env.card, objective=placement_pb2.OBJECTIVE_FIXED_K, k=2)
    bases: dict[str, Callable[[], list[Message]]] = {
        "ComputeLayerCard": lambda: [
            r(model="builtin:tiny", dataset=source, probe_size=4, max_seq_len=16) for source in (path, inline)
        ],
        "GetLayerCard": lambda: [r(name=env.card)],
        "ListLayerCards": lambda: [r(page_size=10, model="builtin:tiny")],
        "PlanPlacement": lambda: [
            r(
                layer_card=env.card,
                objective=placement_pb2.OBJECTIVE_FIXED_K,
                k=2,
                budget=placement_pb2.Budget(max_layers=4, max_step_fraction_of_full=0.9),
                candidate_ranks=[4, 8],
            ),
            r(
                layer_card=env.card,
                objective=placement_pb2.OBJECTIVE_EFFICIENCY,
                target_gain_fraction=0.5,
                budget=placement_pb2.Budget(max_training_time=duration_pb2.Duration(seconds=600)),
                steps=100,
                gain_score="split_half",
                candidate_module_sets=["q_proj,v_proj", "o_proj"],
            ),
        ],
        "CreateTuningJob": lambda: [
            _job("fuzzed", 3),
            _job("fuzzed", 3, path),
            _job("fuzzed", 3, inline),
            r(
                model="builtin:tiny",
                training_data=path,
                card_budget=budget,
                adapter_id="planned",
                tuning_job_id="fz-1",
                request_id="fz-req",
                hyperparameters=hyperparameters(3),
            ),
        ],
        "GetTuningJob": lambda: [r(name=env.job)],
        "ListTuningJobs": lambda: [r(page_size=10, states=[tuning_pb2.TUNING_JOB_STATE_RUNNING])],
        "CancelTuningJob": lambda: [r(name=env.spare_jobs["CancelTuningJob"])],
        "DeleteTuningJob": lambda: [r(name=env.spare_jobs["DeleteTuningJob"])],
        "WatchTuningJob": lambda: [r(name=env.job), r(name=env.job, after_sequence=1)],
        "DeployAdapter": lambda: [r(adapter="adapters/echo", version=1, max_overhead_fraction=0.5)],
        "UndeployAdapter": lambda: [r(adapter="adapters/spare")],
        "ListAdapters": lambda: [r(page_size=10)],
        "Generate": lambda: [
            r(prompt="word 1:", sampling=inference_pb2.SamplingParams(max_tokens=4, stop=["\n"])),
            r(messages=[inference_pb2.ChatMessage(role="system", content="s"), _user("word 1:")]),
        ],
        "GenerateStream": lambda: [
            r(prompt="word 1:", adapter="echo", sampling=inference_pb2.SamplingParams(top_k=4)),
            r(messages=[_user("word 1:")], adapter="echo"),
        ],
    }
    return bases[target.method]() if target.method in bases else [r()]


def _user(content: str) -> inference_pb2.ChatMessage:
    return inference_pb2.ChatMessage(role="user", content=content)


def request_strategy(target: Target, env: FuzzEnv) -> st.SearchStrategy[Message]:
    """Two near-valid requests for each generic one: the deep checks get most of the cases."""
    strings = [s for s in env.strings() if env.job.split("/")[-1] not in s]  # the long job must survive
    bases = _valid(target, env)
    generic = messages(target.request_type.DESCRIPTOR, 2, strings)
    return st.one_of(near_valid(bases, strings), near_valid(bases, strings), generic)


# What a successful reply may carry: ids as AIP-122 spells them, so that a name round-trips (no "\n", no "/").
_ID = r"[a-z][a-z0-9-]{0,62}"
_WELL_FORMED = {
    "TuningJob": [("name", re.compile(f"tuningJobs/{_ID}")), ("adapter_id", re.compile(_ID))],
    "Deployment": [("adapter", re.compile(f"adapters/{_ID}"))],
}


def malformed(response: Message | None) -> str:
    """The first field of a successful reply that is not well formed, or ""."""
    for name, pattern in _WELL_FORMED.get(type(response).__name__, []):
        value = getattr(response, name)
        if not pattern.fullmatch(value):
            return f"accepted and returned {name}={value!r}"
    return ""


class IncidentLog(logging.Handler):
    """The server's own account of each INTERNAL (it runs in this process): exception and where it was raised."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.causes: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        incident = getattr(record, "incident", None)
        if incident and record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            frames = [f for f in traceback.extract_tb(exc.__traceback__) if "layercard_service" in f.filename]
            where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
            self.causes[incident] = f"{type(exc).__name__}: {str(exc)[:120]}{where}"

    def cause(self, details: str) -> str:
        found = re.search(r"incident ([0-9a-f]{12})", details)
        return self.causes.get(found.group(1), "") if found else ""

    @contextlib.contextmanager
    def attached(self) -> Iterator[IncidentLog]:
        logger = logging.getLogger("layercard_service.api.interceptors")
        logger.addHandler(self)
        try:
            yield self
        finally:
            logger.removeHandler(self)


@dataclass
class Tally:
    """Calls per RPC, status histograms, and every failure of a property, with its request."""

    statuses: dict[str, Counter] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)
    not_serving: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    incidents: IncidentLog = field(default_factory=IncidentLog)

    @property
    def cases(self) -> int:
        return sum(sum(c.values()) for c in self.statuses.values())

    def failures_of(self, method: str) -> list[dict]:
        return [f for f in self.failures if f["rpc"].endswith("/" + method)]

    def distinct(self, failures: list[dict] | None = None) -> list[dict]:
        """One failure per kind (RPC, status, cause), with how many cases showed it."""
        kinds: dict[tuple, dict] = {}
        for f in self.failures if failures is None else failures:
            key = (f["rpc"], f["status"], f["cause"] or re.sub(r"incident \w+|\d+", "", f["details"])[:60])
            kinds.setdefault(key, {**f, "cases": 0})["cases"] += 1
        return list(kinds.values())

    def record(
        self, target: Target, request: Message, code: grpc.StatusCode, details: str, serving: bool, bad_reply: str = ""
    ) -> None:
        self.statuses.setdefault(target.method, Counter())[code.name] += 1
        if bad_reply:
            self._fail(target, request, "OK with a malformed reply", bad_reply)
        if code in BAD or (code == grpc.StatusCode.DEADLINE_EXCEEDED and target.method not in EXPENSIVE):
            self._fail(target, request, code.name, details)
        elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and "metadata size exceeds" in details:
            # The error echoed the input into its trailer and the client could not read it: not a status.
            self._fail(target, request, "error trailer over the client's metadata limit", details)
        if not serving:
            self.not_serving += 1
            self._fail(target, request, "health not SERVING after the call", details)

    def _fail(self, target: Target, request: Message, what: str, details: str) -> None:
        text = text_format.MessageToString(request, as_one_line=True, as_utf8=True)
        self.failures.append(
            {
                "rpc": target.path,
                "status": what,
                "details": details[:300],
                "cause": self.incidents.cause(details),
                "request": text[:400] + "…" * (len(text) > 400),
            }
        )


def call(channel: grpc.Channel, target: Target, request: Message) -> tuple[grpc.StatusCode, str, Message | None]:
    """One call; a stream is read to its third message and then cancelled (valid cards and jobs take minutes):
    the first is often "queued" or "load_model", and errors from loading come after it."""
    kind = channel.unary_stream if target.stream else channel.unary_unary
    method = kind(target.path, request_serializer=type(request).SerializeToString,
                  response_deserializer=target.response_type.FromString)  # fmt: skip
    try:
        if not target.stream:
            return grpc.StatusCode.OK, "", method(request, timeout=target.deadline)
        stream = method(request, timeout=target.deadline)
        try:
            first = next(stream, None)
            for _ in range(2):
                if next(stream, None) is None:
                    break
            return grpc.StatusCode.OK, "", first
        finally:
            stream.cancel()
    except grpc.RpcError as err:
        return err.code(), err.details() or "", None


def serving(channel: grpc.Channel) -> bool:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _after(channel: grpc.Channel, target: Target, response: Message | None, tally: Tally) -> None:
    """A job the fuzz created is cancelled at once: it must not start a worker, and it checks Cancel too."""
    if target.method == "CreateTuningJob" and response is not None:
        cancel = next(t for t in targets() if t.method == "CancelTuningJob")
        request = tuning_pb2.CancelTuningJobRequest(name=response.name)
        code, details, _ = call(channel, cancel, request)
        tally.record(cancel, request, code, details, True)


def run_target(channel: grpc.Channel, env: FuzzEnv, target: Target, max_examples: int, tally: Tally) -> None:
    """``max_examples`` generated requests against ``target``; derandomized, so CI sees the same cases each run."""

    def one(request: Message) -> None:
        code, details, response = call(channel, target, request)
        tally.record(target, request, code, details, serving(channel), malformed(response))
        _after(channel, target, response, tally)

    test = given(request=request_strategy(target, env))(one)
    for request in boundary_corpus(_valid(target, env)):  # explicit examples: all run first, every time
        test = example(request=request)(test)
    test = settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=(Phase.explicit, Phase.generate),  # the property is recorded, not raised: nothing to shrink
        suppress_health_check=list(HealthCheck),
    )(test)
    began = time.monotonic()
    with tally.incidents.attached():
        test()
    tally.seconds[target.method] = tally.seconds.get(target.method, 0.0) + time.monotonic() - began
