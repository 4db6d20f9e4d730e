"""One handler per subcommand: arguments -> client call -> ``Output``. Each returns the process exit code."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2
from rich.markup import escape

from layercard.v1 import adapter_pb2, layer_card_pb2, tuning_pb2
from layercard_client import builders, cardplot
from layercard_client.builders import DatasetLike, dataset_source
from layercard_client.cardview import card_json, card_markdown
from layercard_client.cli import render
from layercard_client.cli.demo import run_demo
from layercard_client.cli.exit_codes import EXIT_FAILURE, EXIT_JOB_UNSUCCESSFUL, EXIT_NOT_SERVING, EXIT_OK
from layercard_client.cli.parser import budget_from_args, lora_from_args
from layercard_client.client import LayercardClient
from layercard_client.errors import DeadlineExceeded, Unavailable

__all__ = ["COMMANDS", "UsageProblem"]

Handler = Callable[[LayercardClient, argparse.Namespace, render.Output], int]


class UsageProblem(Exception):
    """A command-line mistake found after parsing (e.g. an unreadable @FILE); exits with the usage code."""


def _dataset(value: str | None) -> DatasetLike | None:
    """``@FILE`` sends a local file inline; anything else goes to the server as is (builtin:NAME or a path)."""
    if value is None or not value.startswith("@"):
        return value
    try:
        return Path(value[1:]).expanduser().read_bytes()
    except OSError as exc:
        raise UsageProblem(f"cannot read dataset file {value[1:]}: {exc}") from exc


def _given(**fields: Any) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not None and value is not False}


def _pages(fetch: Callable[[str], Any], args: argparse.Namespace) -> Iterator[Any]:
    token = args.page_token or ""
    while True:
        page = fetch(token)
        yield page
        token = page.next_page_token
        if not args.all or not token:
            return


# health


def run_health(client: LayercardClient, args: argparse.Namespace, out: render.Output) -> int:
    wait = args.wait
    status = client.health(args.service) if wait is None else _wait_for_serving(client, args.service, wait)
    response = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.ServingStatus.Value(status))
    color = "green" if status == "SERVING" else "red"
    target = f"{client.settings.address} {args.service}".strip()
    out.show(response, f"{escape(target)}: [bold {color}]{status}[/]")
    return EXIT_OK if status == "SERVING" else EXIT_NOT_SERVING


def _wait_for_serving(client: LayercardClient, service: str, wait: float) -> str:
    """Polls until SERVING or ``wait`` seconds pass; waits for the server to come up rather than failing fast."""
    deadline = time.monotonic() + wait
    while True:
        remaining = deadline - time.monotonic()
        try:
            status = client.health(service, timeout=max(remaining, 0.05), wait_for_ready=True)
        except (Unavailable, DeadlineExceeded):
            if deadline - time.monotonic() <= 0:
                raise
            status = "UNKNOWN"
        if status == "SERVING" or deadline - time.monotonic() <= 0:
            return status
        time.sleep(min(0.25, max(deadline - time.monotonic(), 0)))


# card


def run_card(client: LayercardClient, args: argparse.Namespace, out: render.Output) -> int:
    if args.action == "get":
        _check_exports(args)
        card = client.get_layer_card(args.name)
        if out.as_json:
            out.json(card)
        else:
            render.print_wide(out.out, render.card_view(card))
        _export_card(card, args, out)
        return EXIT_OK
    if args.action == "list":
        cards, next_token = [], ""
        for page in _pages(
            lambda token: client.list_layer_cards(page_size=args.page_size, page_token=token, model=args.model), args
        ):
            out.show(page)
            cards.extend(page.layer_cards)
            next_token = page.next_page_token
        if not out.as_json:
            render.print_wide(out.out, render.cards_list_table(cards))  # not a terminal: whole ids, never cut
            if next_token and not args.all:
                out.err.print(f"more: --page-token {next_token} (or --all)", markup=False)
        return EXIT_OK
    return _compute(client, args, out)


def _compute(client: LayercardClient, args: argparse.Namespace, out: render.Output) -> int:
    fields = _given(
        probe_size=args.probe_size,
        compute_coupling=args.coupling,
        compute_performance=args.performance,
        performance_steps=args.performance_steps,
        performance_learning_rates=args.performance_learning_rate,
        device=args.device,
        precision=args.precision,
        seed=args.seed,
        max_seq_len=args.max_seq_len,
        force_recompute=args.force,
    )
    dataset = _dataset(args.dataset)
    _check_exports(args)  # before the work: a missing extra should not cost a long computation
    stream = client.compute_layer_card(
        model=args.model, dataset=dataset_source(dataset, args.split), lora=lora_from_args(args), **fields
    )
    card = None
    with stream:
        if out.as_json:
            for event in stream:
                out.json(event)
                card = event.card if event.HasField("card") else card
        else:
            card = _follow_compute(stream, out)
            if card is not None:
                render.print_wide(out.out, render.card_view(card))
    if card is None:
        out.problem("the stream ended without a card")
        return EXIT_FAILURE
    _export_card(card, args, out)
    return EXIT_OK


def _follow_compute(stream: Iterator[Any], out: render.Output) -> layer_card_pb2.LayerCard | None:
    """Drives the bar from the stream's Progress events; each finished phase leaves a line with its duration,
    so a long card's log shows where the time went."""
    card = None
    phase, phase_start = "", time.monotonic()
    with render.progress_bar(out, eta=True) as progress:
        task = progress.add_task("starting", total=1.0, note="", eta="")
        for event in stream:
            p = event.progress if event.HasField("progress") else None  # None: the card, the stream's last message
            card = event.card if event.HasField("card") else card
            if phase and (p is None or p.phase != phase):
                progress.console.print(f"{phase}: {time.monotonic() - phase_start:.1f} s", style="dim", markup=False)
            if p is None:
                continue
            if p.phase != phase:
                phase, phase_start = p.phase, time.monotonic()
            eta = render.fmt_eta(p.eta.ToTimedelta().total_seconds()) if p.HasField("eta") else ""
            progress.update(task, completed=p.fraction, description=escape(p.phase), note=p.message, eta=eta)
    return card


def _check_exports(args: argparse.Namespace) -> None:
    if args.png_svg:
        cardplot.require_matplotlib()


def _figure_stem(value: str) -> Path:
    """``--png-svg out/card`` and ``--png-svg out/card.png`` both mean out/card.png and out/card.svg."""
    path = Path(value).expanduser()
    return path.with_suffix("") if path.suffix.lower() in cardplot.FIGURE_SUFFIXES else path


def _export_card(card: layer_card_pb2.LayerCard, args: argparse.Namespace, out: render.Output) -> None:
    """Writes the files asked for; names go to stderr so stdout stays the card (or its JSON)."""
    written: list[Path] = []
    try:
        for value, text in ((args.json_out, card_json), (args.markdown, card_markdown)):
            if value:
                path = Path(value).expanduser()
                path.write_text(text(card), encoding="utf-8")
                written.append(path)
        if args.png_svg:
            with out.err.status("drawing the figure"):
                written.extend(cardplot.write_figure(card, _figure_stem(args.png_svg)))
    except OSError as exc:
        raise UsageProblem(f"cannot write {exc.filename or 'an export'}: {exc.strerror or exc}") from exc
    if not out.as_json:
        for path in written:
            out.err.print(f"wrote {path}", markup=False)


# plan


def run_plan(client: LayercardClient, args: argparse.Namespace, out: render.Output) -> int:
    fields = _given(
        k=args.k,
        target_gain_fraction=args.target_gain_fraction,
        candidate_ranks=args.ranks,
        candidate_module_sets=args.module_sets,
        steps=args.steps,
        gain_score=args.gain_score,
        train_examples=args.train_examples,
        batch_size=args.batch_size,
    )
    if args.no_prefix_cache:
        fields["prefix_cache"] = False  # an explicit false: unset is on
    plan = client.plan_placement(args.card, objective=args.objective, budget=budget_from_args(args), **fields)
    out.show(plan, render.placement_table(plan))
    return EXIT_OK


# jobs


def run_jobs(client: LayercardClient, args: argparse.Namespace, out: render.Output) -> int:
    if args.action == "create":
        return _create_job(client, args, out)
    if args.action in ("get", "cancel"):
        call = client.get_tuning_job if args.action == "get" else client.cancel_tuning_job
        job = call(args.name)
        out.show(job, render.job_table(job))
        return EXIT_OK
    if args.action == "delete":
        request = builders.delete_tuning_job(args.name)
        client.delete_tuning_job(request)
        out.show(request, f"deleted {request.name}")  # JSON mode: the request, naming what was deleted
        return EXIT_OK
    if args.action == "watch":
        return _watch_job(client, args.name, args.after, out)
    jobs = []
    for page in _pages(
        lambda token: client.list_tuning_jobs(page_size=args.page_size, page_token=token, states=args.states), args
    ):
        out.show(page)
        jobs.extend(page.tuning_jobs)
    if not out.as_json:
        out.out.print(render.jobs_list_table(jobs))
    return EXIT_OK


def _create_job(client: LayercardClient, args: argparse.Namespace, out: render.Output) -> int:
    lora = lora_from_args(args)
    hyper = _given(
        steps=args.steps,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        seed=args.seed,
        eval_interval=args.eval_interval,
        early_stopping_patience=args.early_stopping_patience,
        early_stopping_min_delta=args.early_stopping_min_delta,
        checkpoint_interval=args.checkpoint_interval,
        max_seq_len=args.max_seq_len,
    )
    if getattr(args, "no_prefix_cache", False):
        hyper["prefix_cache"] = False  # an explicit false (the default is on wherever it is exact)
    fields: dict[str, Any] = _given(
        validation_data=_dataset(args.validation_dataset), tuning_job_id=args.job_id, request_id=args.request_id
    )
    if args.layers is not None:
        fields["explicit_layers"] = _given(layers=args.layers, lora=lora)
    else:
        fields["card_budget"] = _given(
            layer_card=args.card,
            objective=args.objective,
            budget=budget_from_args(args),
            k=args.k,
            target_gain_fraction=args.target_gain_fraction,
        )
        if lora:
            hyper["lora"] = lora
    job = client.create_tuning_job(
        model=args.model,
        training_data=_dataset(args.dataset),
        adapter_id=args.adapter_id,
        hyperparameters=hyper or None,
        **fields,
    )
    out.show(job, render.job_table(job))
    if args.watch:
        return _watch_job(client, job.name, None, out)
    return EXIT_OK


def _watch_job(client: LayercardClient, name: str, after: int | None, out: render.Output) -> int:
    states = tuning_pb2.TuningJobState
    final = None
    if out.as_json:
        with client.watch_tuning_job(name, after_sequence=after) as stream:
            for event in stream:
                out.json(event)
                final = event.state_change if event.HasField("state_change") else final
    else:
        job = client.get_tuning_job(name)  # for total_steps: step events carry only the current step
        with render.progress_bar(out) as progress, client.watch_tuning_job(name, after_sequence=after) as stream:
            state = render.state_name(states, job.state, "TUNING_JOB_STATE_")
            task = progress.add_task(state, total=job.total_steps or None, completed=job.step, note="")
            for event in stream:
                kind = event.WhichOneof("event")
                if kind == "state_change":
                    final = event.state_change
                    state = render.state_name(states, final, "TUNING_JOB_STATE_")
                    progress.update(task, description=state)
                    progress.console.print(f"state: {state} {event.message}".rstrip(), markup=False)
                elif kind == "step":
                    s = event.step
                    progress.update(task, completed=s.step, note=f"loss {s.loss:.4f}  lr {s.learning_rate:.2e}")
                elif kind == "eval":
                    e = event.eval
                    line = f"eval at step {e.step}: loss {e.loss:.4f}, exact match {e.exact_match:.1%}"
                    progress.console.print(line, markup=False)
                elif kind == "checkpoint":
                    progress.console.print(f"checkpoint at step {event.checkpoint.step}", markup=False)
                elif kind == "prefix_cache":  # whether the frozen prefix is cached, and why not
                    progress.console.print(event.message, markup=False)
        final_job = client.get_tuning_job(name)
        out.out.print(render.job_table(final_job))
        final = final_job.state
    if final in (states.TUNING_JOB_STATE_FAILED, states.TUNING_JOB_STATE_CANCELLED):
        return EXIT_JOB_UNSUCCESSFUL
    return EXIT_OK


# adapters


def run_adapters(client: LayercardClient, args: argparse.Namespace, out: render.Output) -> int:
    if args.action == "deploy":
        deployment = client.deploy_adapter(
            args.adapter,
            version=args.version,
            max_overhead_fraction=args.max_overhead,
            force=args.force or None,
            validate_only=args.validate_only or None,
            full_latency_probe=args.full_latency_probe or None,
            rollback_over_budget=args.rollback_over_budget or None,
            pool=args.pool or None,
        )
        out.show(deployment, render.deployment_table(deployment))
    elif args.action == "undeploy":
        response = client.undeploy_adapter(args.adapter)
        out.show(response, render.deployment_table(adapter_pb2.Deployment(), response.replicas))
    else:
        adapters = []
        for page in _pages(lambda token: client.list_adapters(page_size=args.page_size, page_token=token), args):
            out.show(page)
            adapters.extend(page.adapters)
        if not out.as_json:
            out.out.print(render.adapters_list_table(adapters))
    return EXIT_OK


# generate


def _generate_input(args: argparse.Namespace) -> tuple[str | None, list[tuple[str, str]] | None]:
    """The prompt, or the chat's messages: --system first, then each --message, then the prompt as the user's."""
    if not (args.chat or args.system is not None or args.message):
        return (sys.stdin.read() if args.prompt in (None, "-") else args.prompt), None
    messages = [("system", args.system)] if args.system is not None else []
    messages += args.message or []
    if args.prompt is not None or not args.message:
        messages.append(("user", sys.stdin.read() if args.prompt in (None, "-") else args.prompt))
    return None, messages


def run_generate(client: LayercardClient, args: argparse.Namespace, out: render.Output) -> int:
    prompt, messages = _generate_input(args)
    sampling = _given(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
    )
    if not args.stream:
        response = client.generate(prompt, messages=messages, adapter=args.adapter, sampling=sampling or None)
        if out.as_json:
            out.json(response)
        else:
            sys.stdout.write(response.text + "\n")
            out.err.print(
                f"[{response.served_model} on {response.replica}; {response.usage.completion_tokens} tokens, "
                f"{response.latency_ms:.0f} ms, finish {response.finish_reason}]",
                style="dim",
                markup=False,
            )
        return EXIT_OK
    with client.generate_stream(prompt, messages=messages, adapter=args.adapter, sampling=sampling or None) as stream:
        last = None
        for chunk in stream:
            last = chunk
            if out.as_json:
                out.json(chunk)
            else:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()  # people watch the text appear
    if not out.as_json:
        sys.stdout.write("\n")
        if last is not None:
            footer = f"[{last.served_model} on {last.replica}; finish {last.finish_reason}]"
            out.err.print(footer, style="dim", markup=False)
    return EXIT_OK


COMMANDS: dict[str, Handler] = {
    "health": run_health,
    "card": run_card,
    "plan": run_plan,
    "jobs": run_jobs,
    "adapters": run_adapters,
    "generate": run_generate,
    "demo": run_demo,
}
