"""The ``layercard`` command line: global options, one subcommand per service, the exit codes in ``--help``."""

from __future__ import annotations

import argparse
import os

from layercard_client.channel import DEFAULT_ADDRESS
from layercard_client.cli.exit_codes import epilog

__all__ = ["BUDGET_FLAGS", "budget_from_args", "build_parser", "lora_from_args"]

_OBJECTIVES = ("accuracy", "efficiency", "balanced", "fixed-k")
_STATES = ("queued", "running", "cancelling", "succeeded", "failed", "cancelled")


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _ints(value: str) -> list[int]:
    try:
        return [int(part) for part in _csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def _positive(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return number


def _add_lora(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("adapter shape")
    group.add_argument("--rank", type=int, help="LoRA rank r (server default 8)")
    group.add_argument("--alpha", type=float, help="LoRA alpha (server default 2 * rank)")
    group.add_argument("--target-modules", type=_csv, metavar="A,B", help="module types, e.g. q_proj,v_proj")


def lora_from_args(args: argparse.Namespace) -> dict | None:
    lora = {"rank": args.rank, "alpha": args.alpha, "target_modules": args.target_modules}
    lora = {key: value for key, value in lora.items() if value is not None}
    return lora or None


def _add_budget(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("objective and budget (every limit optional)")
    group.add_argument("--objective", choices=_OBJECTIVES, help="default accuracy")
    group.add_argument("--k", type=int, help="number of layers, for --objective fixed-k")
    group.add_argument("--target-gain-fraction", type=float, help="for --objective efficiency (default 0.9)")
    for flag, _, kind, metavar, help_ in BUDGET_FLAGS:
        group.add_argument(flag, type=kind, metavar=metavar, help=help_)
    group.add_argument("--serving-engine", choices=("vllm", "peft"))
    group.add_argument(
        "--serving-concurrency", type=int, metavar="N", help="requests at once the vLLM serving limits hold for"
    )


# The budget options: (flag, the contract's Budget field, type, metavar, help). The client keeps its own list
# (it imports no service code); tests/unit/test_budget_kinds.py checks that it covers exactly Budget's fields.
BUDGET_FLAGS: tuple[tuple[str, str, type, str | None, str | None], ...] = (
    ("--max-step-seconds", "max_step_seconds", float, None, None),
    ("--max-step-fraction", "max_step_fraction_of_full", float, None, "of full-layer LoRA's step time"),
    ("--max-peak-memory", "max_peak_memory_bytes", int, "BYTES", None),
    ("--max-adapter-params", "max_adapter_parameters", int, None, None),
    ("--max-adapter-bytes", "max_adapter_bytes", int, None, None),
    ("--max-layers", "max_layers", int, None, None),
    ("--max-serving-ms-per-token", "max_serving_overhead_ms_per_token", float, None, None),
    ("--max-serving-fraction", "max_serving_overhead_fraction", float, None, None),
    ("--max-training-time", "max_training_time", float, "SECONDS", None),
)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def budget_from_args(args: argparse.Namespace) -> dict | None:
    budget = {field: getattr(args, _dest(flag)) for flag, field, *_ in BUDGET_FLAGS}
    budget["serving_engine"] = args.serving_engine
    budget["serving_concurrency"] = args.serving_concurrency
    budget = {key: value for key, value in budget.items() if value is not None}
    if "max_training_time" in budget:  # a Duration
        total = budget["max_training_time"]
        budget["max_training_time"] = {"seconds": int(total), "nanos": int((total - int(total)) * 1e9)}
    return budget or None


def _add_dataset(parser: argparse.ArgumentParser, flag: str, *, required: bool, help_: str) -> None:
    parser.add_argument(
        flag,
        required=required,
        metavar="SOURCE",
        help=f"{help_}: builtin:NAME, a path on the server, or @FILE to send a local JSONL file inline",
    )


def _add_card_exports(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("exports (written as well as the output on stdout)")
    group.add_argument(
        "--png-svg",
        metavar="PATH",
        help="write the card's figure to PATH.png and PATH.svg (needs: pip install 'layercard-client[render]')",
    )
    group.add_argument("--markdown", metavar="FILE", help="write a Markdown report of the card")
    group.add_argument("--json-out", metavar="FILE", help="write the card as protobuf JSON (proto field names)")


def _add_paging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--page-size", type=int, help="items per page (server default 50)")
    parser.add_argument("--page-token", help="continue from a previous page's next_page_token")
    parser.add_argument("--all", action="store_true", help="follow page tokens to the end")


def _cards(sub: argparse._SubParsersAction) -> None:
    card = sub.add_parser("card", help="Layer Cards: compute, get, list", description="Layer Cards of a base model")
    actions = card.add_subparsers(dest="action", required=True, metavar="ACTION")
    compute = actions.add_parser("compute", help="compute a card (progress, then the card)")
    compute.add_argument("--model", required=True, help="builtin:tiny or a model directory on the server")
    _add_dataset(compute, "--dataset", required=True, help_="the task's data")
    compute.add_argument("--split", help="split of a built-in task (train or validation)")
    compute.add_argument("--probe-size", type=int, help="probe examples (server default 256)")
    compute.add_argument("--coupling", action="store_true", help="also compute the L x L coupling matrix")
    compute.add_argument("--performance", action="store_true", help="also run short single-layer trainings")
    compute.add_argument("--performance-steps", type=int)
    compute.add_argument(
        "--performance-learning-rate",
        type=float,
        action="append",
        help="a learning rate of the all-layer pilots (repeat it; server default 1e-3 and 3e-3)",
    )
    compute.add_argument("--device", choices=("cpu", "cuda"))
    compute.add_argument("--precision", choices=("float32", "bfloat16", "float16"))
    compute.add_argument("--seed", type=int)
    compute.add_argument("--max-seq-len", type=int)
    compute.add_argument("--force", action="store_true", help="recompute even when the store has this card")
    _add_lora(compute)
    _add_card_exports(compute)
    get = actions.add_parser("get", help="show a stored card")
    get.add_argument("name", help="layerCards/ID or ID")
    _add_card_exports(get)
    listing = actions.add_parser("list", help="list stored cards, newest first")
    listing.add_argument("--model", help="only cards of this model")
    _add_paging(listing)


def _plan(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser("plan", help="plan a LoRA placement from a card under a budget")
    plan.add_argument("card", help="layerCards/ID or ID")
    plan.add_argument("--ranks", type=_ints, metavar="R,R", help="ranks the planner may choose from")
    plan.add_argument(
        "--module-set",
        action="append",
        dest="module_sets",
        metavar="A,B",
        help="a module-type set the planner may choose (repeatable)",
    )
    plan.add_argument("--steps", type=int, help="with --max-training-time: the reference number of steps")
    plan.add_argument(
        "--no-prefix-cache", action="store_true", help="price the run without the frozen-prefix cache (a job's option)"
    )
    plan.add_argument("--train-examples", type=int, help="the run's training examples (default: the card's dataset)")
    plan.add_argument(
        "--batch-size", type=int, help="the run's batch size, for the cache's epoch rule (default: the card's)"
    )
    plan.add_argument(
        "--gain-score", choices=("resnorm", "split_half", "stream_normalized"), help="per-layer score (default resnorm)"
    )
    _add_budget(plan)


def _jobs(sub: argparse._SubParsersAction) -> None:
    jobs = sub.add_parser("jobs", help="tuning jobs: create, get, list, cancel, delete, watch")
    actions = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="queue a LoRA tuning job")
    create.add_argument("--model", required=True)
    _add_dataset(create, "--dataset", required=True, help_="training data")
    _add_dataset(create, "--validation-dataset", required=False, help_="validation data")
    create.add_argument("--adapter-id", required=True, help="name of the adapter the job produces")
    where = create.add_mutually_exclusive_group(required=True)
    where.add_argument("--layers", type=_ints, metavar="I,J", help="explicit layer indices")
    where.add_argument("--card", help="plan the placement from this card and the budget options")
    steps = create.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int)
    steps.add_argument("--epochs", type=float)
    create.add_argument("--learning-rate", type=float)
    create.add_argument("--batch-size", type=int)
    create.add_argument("--seed", type=int)
    create.add_argument("--eval-interval", type=int)
    create.add_argument("--early-stopping-patience", type=int)
    create.add_argument(
        "--early-stopping-min-delta", type=float, help="smallest eval-loss decrease that counts (default 1e-4)"
    )
    create.add_argument("--checkpoint-interval", type=int)
    create.add_argument("--max-seq-len", type=int)
    create.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="do not cache the frozen blocks' hidden states (on by default wherever that is exact)",
    )
    create.add_argument("--job-id", help="client-chosen job id")
    create.add_argument("--request-id", help="idempotency key (default: a fresh uuid4)")
    create.add_argument("--watch", action="store_true", help="then watch the job until it ends")
    _add_lora(create)
    _add_budget(create)
    for name, text in (
        ("get", "show a job"),
        ("cancel", "ask a job to stop"),
        ("delete", "delete an ended job (its adapter versions stay)"),
    ):
        parser = actions.add_parser(name, help=text)
        parser.add_argument("name", help="tuningJobs/ID or ID")
    listing = actions.add_parser("list", help="list jobs, newest first")
    listing.add_argument("--state", action="append", choices=_STATES, dest="states", help="repeatable")
    _add_paging(listing)
    watch = actions.add_parser("watch", help="stream a job's events until it ends")
    watch.add_argument("name", help="tuningJobs/ID or ID")
    watch.add_argument("--after", type=int, metavar="SEQUENCE", help="skip events up to this sequence number")


def _adapters(sub: argparse._SubParsersAction) -> None:
    adapters = sub.add_parser("adapters", help="adapters: deploy, undeploy, list")
    actions = adapters.add_subparsers(dest="action", required=True, metavar="ACTION")
    deploy = actions.add_parser("deploy", help="hot-load an adapter version into every vLLM replica")
    deploy.add_argument("adapter", help="adapters/ID or ID")
    deploy.add_argument("--version", type=int, help="default: the newest")
    deploy.add_argument("--max-overhead", type=float, metavar="FRACTION", help="serving-latency budget")
    deploy.add_argument("--force", action="store_true", help="deploy even when over the latency budget")
    deploy.add_argument("--validate-only", action="store_true", help="check without loading")
    deploy.add_argument(
        "--full-latency-probe", action="store_true", help="probe latency even when the serving shape is calibrated"
    )
    deploy.add_argument(
        "--rollback-over-budget",
        action="store_true",
        help="judge it on live traffic and roll back when over --max-overhead",
    )
    deploy.add_argument(
        "--pool", help="the serving pool to deploy to (default: the plan's, else the current one, else the leanest)"
    )
    undeploy = actions.add_parser("undeploy", help="remove an adapter from every replica")
    undeploy.add_argument("adapter", help="adapters/ID or ID")
    listing = actions.add_parser("list", help="adapters, versions, desired against observed per replica")
    _add_paging(listing)


def _chat_message(value: str) -> tuple[str, str]:
    role, colon, content = value.partition(":")
    if not colon or not role.strip():
        raise argparse.ArgumentTypeError(f"expected ROLE:CONTENT (user:..., assistant:..., system:...), got {value!r}")
    return role.strip(), content


def _generate(sub: argparse._SubParsersAction) -> None:
    generate = sub.add_parser(
        "generate",
        help="generate a completion or a chat answer, with the base model or an adapter",
        description=(
            "Completes a raw prompt, or with --chat (or --system/--message) answers a conversation in the base "
            "model's own chat template: the prompt is the user's last message."
        ),
    )
    generate.add_argument(
        "prompt",
        nargs="?",
        help="the prompt (with --chat: the user's message); '-' or nothing reads stdin (in a chat given with "
        "--message: nothing adds no message)",
    )
    generate.add_argument("--chat", action="store_true", help="send the prompt as a chat's user message")
    generate.add_argument("--system", metavar="TEXT", help="a chat's system message, first (implies --chat)")
    generate.add_argument(
        "--message",
        action="append",
        type=_chat_message,
        metavar="ROLE:CONTENT",
        help="an earlier turn of the chat, in order (repeatable; implies --chat)",
    )
    generate.add_argument("--adapter", help="a deployed adapter id; default: the base model")
    generate.add_argument("--stream", action="store_true", help="print text as it is produced")
    generate.add_argument("--max-tokens", type=int)
    generate.add_argument("--temperature", type=float)
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--top-k", type=int)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--stop", action="append", help="a stop string (repeatable)")


def _demo(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo",
        help="run the whole pipeline once: card, plan, tuning job, deploy, generate",
        description=(
            "Computes a Layer Card, plans a placement under a step-time budget, trains a LoRA adapter on that plan, "
            "hot-loads it into the service's vLLM servers and generates a few of the task's prompts with and "
            "without it, printing the figures of each step. Stops at the first failing step with its exit code."
        ),
    )
    demo.add_argument(
        "--model", default="builtin:tiny", help="builtin:tiny (default), builtin:smollm2-135m or a model directory"
    )
    demo.add_argument(
        "--dataset",
        metavar="SOURCE",
        help="builtin:NAME or a path (default: builtin:facts for a built-in instruct model, else builtin:cipher)",
    )
    # Per dataset, defaults that learn it in a few minutes on 2 cores (DEMO_TASKS in cli/demo.py).
    demo.add_argument("--probe-size", type=int, help="probe examples of the card (cipher 64, facts 16)")
    demo.add_argument(
        "--max-step-fraction",
        type=float,
        default=1.0,
        help="plan's budget: of full-layer LoRA's step time (default 1.0; try 0.6 to see what a budget costs)",
    )
    demo.add_argument("--adapter-id", help="adapter the job produces (default demo-cipher, demo-facts, ...)")
    demo.add_argument("--steps", type=int, help="training steps (cipher 600, facts 40)")
    demo.add_argument("--learning-rate", type=float, help="server default 1e-3")
    demo.add_argument("--max-overhead", type=float, metavar="FRACTION", help="deploy's serving-latency budget")
    demo.add_argument("--force", action="store_true", help="deploy even when over the latency budget")
    demo.add_argument("--skip-deploy", action="store_true", help="stop after the tuning job (no vLLM needed)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layercard",
        description="Call the layercard service: Layer Cards, placement plans, tuning jobs, adapters, inference.",
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    env = os.environ
    parser.add_argument(
        "--address",
        default=env.get("LAYERCARD_ADDRESS", DEFAULT_ADDRESS),
        help=f"host:port of the service (env LAYERCARD_ADDRESS; default {DEFAULT_ADDRESS})",
    )
    parser.add_argument("--token", default=env.get("LAYERCARD_TOKEN"), help="bearer token (env LAYERCARD_TOKEN)")
    parser.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    parser.add_argument(
        "--ca-file", default=env.get("LAYERCARD_CA_FILE"), help="CA bundle to verify the server (implies --tls)"
    )
    parser.add_argument("--client-cert", help="client certificate for mutual TLS (with --client-key)")
    parser.add_argument("--client-key", help="client private key for mutual TLS")
    parser.add_argument(
        "--timeout",
        type=_positive,
        metavar="SECONDS",
        help="deadline of each call, streams included (default: 30 for calls, none for streams)",
    )
    parser.add_argument("--json", action="store_true", help="print protobuf JSON, one document per line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    health = sub.add_parser("health", help="check the server's health (needs no token)")
    health.add_argument("--service", default="", help="a service's full name; default: the whole server")
    health.add_argument("--wait", type=_positive, metavar="SECONDS", help="wait up to this long for SERVING")
    _cards(sub)
    _plan(sub)
    _jobs(sub)
    _adapters(sub)
    _generate(sub)
    _demo(sub)
    return parser
