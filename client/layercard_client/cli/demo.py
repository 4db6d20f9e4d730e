"""``layercard demo``: the whole pipeline once against a running service, with the figures of each step.

    1 card      ComputeLayerCard on --model and --dataset (a small probe)
    2 plan      PlanPlacement on that card under a step-time budget (--max-step-fraction of full-layer LoRA)
    3 tuning    CreateTuningJob on the plan itself, then WatchTuningJob until it ends
    4 deploy    DeployAdapter: hot-load the new version into every vLLM replica (skipped with --skip-deploy)
    5 generate  a few prompts of the task, with and without the adapter

The dataset suits the model: the cipher for a base model such as builtin:tiny, the chat task builtin:facts for an
instruct model (``make run`` passes the one it chose; alone, the demo knows the built-in instruct models by name).
Each known task brings its own probe size, steps and questions (``DEMO_TASKS``); flags override them.

Every step is an ordinary RPC through ``LayercardClient``; nothing here knows the service's internals. A step
that fails stops the demo with the exit code of its status (``exit_codes``), after saying which step it was.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message
from rich.console import RenderableType
from rich.markup import escape
from rich.table import Table

from layercard.v1 import adapter_pb2, layer_card_pb2, placement_pb2, tuning_pb2
from layercard_client.builders import dataset_source
from layercard_client.cli import demo_view, render
from layercard_client.cli.exit_codes import (
    EXIT_DEPLOYMENT_FAILED,
    EXIT_FAILURE,
    EXIT_JOB_UNSUCCESSFUL,
    EXIT_OK,
    exit_code_for,
)
from layercard_client.client import LayercardClient
from layercard_client.errors import FailedPrecondition, LayercardClientError, Unimplemented

__all__ = [
    "CHAT_BUILTIN_MODELS",
    "CHAT_DATASET",
    "DEFAULT_DATASET",
    "DEMO_PROMPTS",
    "DEMO_TASKS",
    "DemoSettings",
    "DemoTask",
    "default_dataset",
    "demo_settings",
    "generate_call",
    "run_demo",
]

DEFAULT_DATASET = "builtin:cipher"
CHAT_DATASET = "builtin:facts"
# The built-in instruct models (the service's BuiltinModel.chat; a test keeps the two lists equal). A model
# directory's kind is known to the server only: `make run` passes --dataset for it.
CHAT_BUILTIN_MODELS = frozenset({"builtin:smollm2-135m"})

# Validation examples of the built-in tasks, written exactly as the task formats them (prompt, completion).
# The client never imports the service, so they are copied here; a test checks them against the task generator.
DEMO_PROMPTS: dict[str, tuple[tuple[str, str], ...]] = {
    "builtin:cipher": (
        ("cipher: t s r s =", " o i c i"),
        ("cipher: d e l a =", " n s t d"),
        ("cipher: c o l l =", " a r t t"),
    ),
    # A chat task's entries are (the user's question, the assistant's answer) of its validation split.
    CHAT_DATASET: (
        ("What is the capital of Luzeland?", "Trera"),
        ("Which city is the capital of Reria?", "Fukira"),
        ("Name the capital of Gokestan.", "Vara"),
    ),
}


@dataclass(frozen=True)
class DemoTask:
    """What the demo does on one dataset when the flags do not say: the probe, the job, the questions."""

    probe_size: int
    steps: int
    adapter_id: str
    max_tokens: int  # greedy generation stops at EOS long before, on a right answer
    chat: bool = False  # questions of a chat task are a user's turn, answered in the model's chat template
    learning_rate: float | None = None  # None: the server's default


# The defaults learn the built-in cipher (3/3 exact on the shown prompts, about 2 minutes on 2 cores); under
# tighter step budgets no placement learns it in the same steps (docs/METHOD.md, the placement benchmark). An
# instruct model of 135M parameters takes seconds per step on 2 cores: a small probe, a short job at a higher
# learning rate (bench/results/real_model.md: every block at 3e-3 learns builtin:facts 0% -> 100% in 40 steps;
# the top three blocks alone reach 25%).
DEMO_TASKS: dict[str, DemoTask] = {
    DEFAULT_DATASET: DemoTask(probe_size=64, steps=600, adapter_id="demo-cipher", max_tokens=8),
    CHAT_DATASET: DemoTask(
        probe_size=16, steps=40, adapter_id="demo-facts", max_tokens=32, chat=True, learning_rate=3e-3
    ),
}
_OTHER_TASK = DemoTask(probe_size=64, steps=600, adapter_id="demo", max_tokens=32)  # a JSONL file, another task


@dataclass(frozen=True)
class DemoSettings:
    """The demo's flags with every default filled in for the model and the dataset."""

    model: str
    dataset: str
    task: DemoTask
    probe_size: int
    steps: int
    adapter_id: str
    learning_rate: float | None
    questions: tuple[tuple[str, str], ...]


def default_dataset(model: str) -> str:
    """The dataset the demo tunes ``model`` on when --dataset is not given: a chat task for an instruct model."""
    return CHAT_DATASET if model in CHAT_BUILTIN_MODELS else DEFAULT_DATASET


def demo_settings(args: argparse.Namespace) -> DemoSettings:
    dataset = args.dataset or default_dataset(args.model)
    task = DEMO_TASKS.get(dataset, _OTHER_TASK)
    return DemoSettings(
        model=args.model,
        dataset=dataset,
        task=task,
        probe_size=_given(args.probe_size, task.probe_size),
        steps=_given(args.steps, task.steps),
        adapter_id=_given(args.adapter_id, task.adapter_id),
        learning_rate=_given(args.learning_rate, task.learning_rate),
        questions=DEMO_PROMPTS.get(dataset, ()),
    )


def _given(flag: Any, default: Any) -> Any:
    return default if flag is None else flag


def generate_call(task: DemoTask, question: str, adapter: str | None) -> dict[str, Any]:
    """The keyword arguments of ``LayercardClient.generate`` for one of the demo's questions, with the base model
    (``adapter`` None) or the adapter: the one place the demo builds a Generate call. A chat task's question
    (``task.chat``) is the user's turn of a chat, served in the model's chat template; any other goes as its raw
    prompt text."""
    sampling = {"max_tokens": task.max_tokens, "temperature": 0.0}
    if task.chat:
        return {"messages": [("user", question)], "adapter": adapter, "sampling": sampling}
    return {"prompt": question, "adapter": adapter, "sampling": sampling}


# Loading into every replica and measuring latency takes longer than an ordinary call's 30 s on CPU vLLM.
_DEPLOY_TIMEOUT = 300.0
_STEPS = ("card", "plan", "tuning", "deploy", "generate")
_STATES = tuning_pb2.TuningJobState


class _Stop(Exception):
    """A step ended the demo without an RPC error (a failed job, a failed deployment); carries the exit code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class _Demo:
    def __init__(self, client: LayercardClient, args: argparse.Namespace, out: render.Output) -> None:
        self.client, self.args, self.out = client, args, out
        self.settings = demo_settings(args)
        self.timings: dict[str, float] = {}
        self.steps = _STEPS[:3] if args.skip_deploy else _STEPS

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """A heading, the step's wall time, and on an RPC error the name of the step that failed."""
        number = _STEPS.index(name) + 1
        if not self.out.as_json:
            self.out.out.print()
            self.out.out.rule(f"[bold]{number}/{len(self.steps)} {name}", align="left")
        start = time.monotonic()
        try:
            yield
        except LayercardClientError as exc:
            self.out.error(exc)
            hint = _hint(name, exc)
            self.out.problem(f"the demo stopped at step {number} ({name})" + (f": {hint}" if hint else ""))
            raise _Stop(exit_code_for(exc)) from exc
        finally:
            self.timings[name] = time.monotonic() - start

    def show(self, message: Message, parts: list[RenderableType]) -> None:
        """The response as JSON for scripts, or its figures for people."""
        if self.out.as_json:
            self.out.json(message)
        else:
            self.print(parts)

    def print(self, parts: list[RenderableType]) -> None:
        for part in parts:  # tables whole (a cut table is unreadable), text wrapped
            if isinstance(part, Table):
                render.print_wide(self.out.out, part)
            else:
                self.out.out.print(part)

    def note(self, text: str) -> None:
        if not self.out.as_json:
            self.out.out.print(text, markup=False, soft_wrap=True)

    # the steps

    def card(self) -> layer_card_pb2.LayerCard:
        s = self.settings
        start = time.monotonic()
        self.note(f"{s.model} on {s.dataset}, a probe of {s.probe_size} examples")
        stream = self.client.compute_layer_card(
            model=s.model, dataset=dataset_source(s.dataset), probe_size=s.probe_size
        )
        card = None
        with stream, render.progress_bar(self.out, eta=True) as progress:
            task = progress.add_task("starting", total=1.0, note="", eta="")
            for event in stream:
                if event.HasField("card"):
                    card = event.card
                    continue
                p = event.progress
                eta = render.fmt_eta(p.eta.ToTimedelta().total_seconds()) if p.HasField("eta") else ""
                progress.update(task, completed=p.fraction, description=escape(p.phase), note=p.message, eta=eta)
        if card is None:
            self.out.problem("the demo stopped at step 1 (card): the stream ended without a card")
            raise _Stop(EXIT_FAILURE)
        self.show(card, demo_view.card_figures(card, time.monotonic() - start))
        return card

    def plan(self, card: layer_card_pb2.LayerCard) -> placement_pb2.Placement:
        fraction = self.args.max_step_fraction
        plan = self.client.plan_placement(card.name, budget={"max_step_fraction_of_full": fraction})
        self.show(plan, demo_view.plan_figures(plan, fraction))
        return plan

    def tuning(self, plan: placement_pb2.Placement) -> tuning_pb2.TuningJob:
        s = self.settings
        hyper: dict[str, Any] = {"steps": s.steps}
        if s.learning_rate is not None:
            hyper["learning_rate"] = s.learning_rate
        job = self.client.create_tuning_job(
            model=s.model,
            training_data=dataset_source(s.dataset),
            adapter_id=s.adapter_id,
            placement=plan,  # the plan itself: its layers, rank and modules, and its predictions to compare with
            hyperparameters=hyper,
        )
        self.note(f"created {job.name}: adapter {job.adapter_id}, {job.total_steps} steps on layers {_layers(plan)}")
        if self.out.as_json:
            self.out.json(job)
            with self.client.watch_tuning_job(job.name) as stream:
                for _ in stream:
                    pass  # wait for the end; scripts read the final job below
        else:
            self._watch(job)
        done = self.client.get_tuning_job(job.name)
        self.show(done, demo_view.job_figures(done))
        if done.state != _STATES.TUNING_JOB_STATE_SUCCEEDED:
            state = render.state_name(_STATES, done.state, "TUNING_JOB_STATE_")
            self.out.problem(f"the demo stopped at step 3 (tuning): the job ended {state}")
            raise _Stop(EXIT_JOB_UNSUCCESSFUL)
        return done

    def _watch(self, job: tuning_pb2.TuningJob) -> None:
        """A bar while the job runs, and a line per fifth of the steps and per evaluation, which stay on screen."""
        total = job.total_steps or self.settings.steps
        every = max(total // 5, 1)
        with render.progress_bar(self.out) as progress, self.client.watch_tuning_job(job.name) as stream:
            task = progress.add_task("queued", total=total, note="")
            for event in stream:
                kind = event.WhichOneof("event")
                if kind == "state_change":
                    state = render.state_name(_STATES, event.state_change, "TUNING_JOB_STATE_")
                    progress.update(task, description=state)
                    progress.console.print(f"state: {state} {event.message}".rstrip(), markup=False)
                elif kind == "step":
                    s = event.step
                    note = f"loss {s.loss:.4f}"
                    progress.update(task, completed=s.step, note=note)
                    if s.step % every == 0 or s.step == total:
                        line = f"step {s.step:>{len(str(total))}}/{total}  {note}  {s.tokens_per_second:,.0f} tokens/s"
                        progress.console.print(line, markup=False)
                elif kind == "eval":
                    e = event.eval
                    line = f"eval at step {e.step}: validation loss {e.loss:.4f}, exact match {e.exact_match:.1%}"
                    progress.console.print(line, markup=False)

    def deploy(self, job: tuning_pb2.TuningJob) -> adapter_pb2.Deployment:
        args = self.args
        deployment = self.client.deploy_adapter(
            job.adapter_id,  # sent as "adapters/{id}"
            version=_version(job.result.adapter_version),
            max_overhead_fraction=args.max_overhead,
            force=args.force or None,
            timeout=args.timeout or _DEPLOY_TIMEOUT,
        )
        self.show(deployment, demo_view.deployment_figures(deployment))
        if deployment.state == adapter_pb2.DEPLOYMENT_STATE_FAILED:
            self.out.problem("the demo stopped at step 4 (deploy): the deployment ended FAILED")
            raise _Stop(EXIT_DEPLOYMENT_FAILED)
        return deployment

    def generate(self, adapter_id: str) -> None:
        s = self.settings
        if not s.questions:
            known = ", ".join(name for name, questions in DEMO_PROMPTS.items() if questions)
            self.note(f"no fixed questions for {s.dataset} (the demo has some for {known}); skipped")
            return
        rows = []
        for prompt, expected in s.questions:
            base = self.client.generate(**generate_call(s.task, prompt, None))
            adapted = self.client.generate(**generate_call(s.task, prompt, adapter_id))
            if self.out.as_json:
                self.out.json(base)
                self.out.json(adapted)
            rows.append(demo_view.GenerationRow(prompt, expected, base, adapted))
        if not self.out.as_json:
            self.print(demo_view.generation_table(rows, adapter_id))

    def summary(self) -> None:
        times = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.timings.items())
        self.note(f"\ndemo finished in {sum(self.timings.values()):.1f} s ({times})")


def _layers(plan: placement_pb2.Placement) -> str:
    return ", ".join(map(str, plan.layers)) or "-"


def _version(adapter_version: str) -> int:
    """ "adapters/{id}/versions/{n}" -> n; 0 (the server's "newest") when the name has another shape."""
    tail = adapter_version.rsplit("/", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _hint(step: str, exc: LayercardClientError) -> str:
    if step == "deploy" and isinstance(exc, Unimplemented):
        return (
            "this service cannot deploy adapters yet (DeployAdapter answered UNIMPLEMENTED). The adapter is trained "
            "and stored; run the demo with --skip-deploy to stop after tuning."
        )
    if step == "deploy" and isinstance(exc, FailedPrecondition) and exc.reason == "NO_VLLM_SERVERS":
        return (
            "the service has no vLLM servers to load the adapter into (start it with --vllm-urls, or use make run). "
            "The adapter is trained and stored; run the demo with --skip-deploy to stop after tuning."
        )
    return ""  # the error itself, printed just before, says it all


def run_demo(client: LayercardClient, args: argparse.Namespace, out: render.Output) -> int:
    demo = _Demo(client, args, out)
    try:
        with demo.step("card"):
            card = demo.card()
        with demo.step("plan"):
            plan = demo.plan(card)
        with demo.step("tuning"):
            job = demo.tuning(plan)
        if args.skip_deploy:
            demo.note(f"\n--skip-deploy: stopping after tuning; the adapter is {job.result.adapter_version}")
        else:
            with demo.step("deploy"):
                demo.deploy(job)
            with demo.step("generate"):
                demo.generate(job.adapter_id)
    except _Stop as stop:
        return stop.code
    demo.summary()
    return EXIT_OK
