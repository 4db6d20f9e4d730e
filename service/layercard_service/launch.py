"""``make run``: the embedded default on one machine.

Starts a real vLLM (CPU) server with the built-in model and LoRA enabled, supervises it (restarted with
backoff if it dies), runs the layercard service on localhost pointed at it, runs ``layercard demo`` once
against both (card, plan, tuning job, hot-load, generate; ``--no-demo`` skips it), prints how to call them,
and stops everything cleanly on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from layercard_service.config import ServiceConfig
from layercard_service.logs import configure_logging
from layercard_service.models.builtin import builtin_model_path
from layercard_service.server import LayercardServer
from layercard_service.serving.vllm_process import VllmProcess, VllmServerSettings

__all__ = ["main"]

log = logging.getLogger("layercard.launch")

VLLM_MAX_LORA_RANK = 8


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="layercard-launch", description=__doc__)
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


async def _run(args: argparse.Namespace) -> None:
    vllm = None
    if not args.no_vllm:
        settings = VllmServerSettings(
            model=builtin_model_path("tiny"),
            served_model_name="builtin:tiny",
            port=args.vllm_port,
            max_loras=4,
            max_lora_rank=VLLM_MAX_LORA_RANK,
        )
        vllm = VllmProcess(settings)
        print(
            f"starting vLLM (CPU) with the built-in model on port {args.vllm_port}; this takes about a minute",
            flush=True,
        )
        await asyncio.to_thread(vllm.start)
        await asyncio.to_thread(vllm.wait_ready)
        print(f"vLLM ready at {vllm.url} after {vllm.startup_seconds:.0f} s (log: {vllm.log_path})", flush=True)
    config = ServiceConfig(
        port=args.port,
        metrics_port=args.metrics_port,
        data_dir=args.data_dir,
        vllm_urls=(vllm.url,) if vllm else (),
        vllm_model="builtin:tiny",
        max_lora_rank=VLLM_MAX_LORA_RANK,  # what the local vLLM accepts: jobs train within it, deploys check it
        log_format="text",
    )
    server = LayercardServer(config)
    await server.start()
    address = f"127.0.0.1:{server.port}"

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    supervisor = asyncio.create_task(_supervise(vllm, stopping)) if vllm else None
    if not args.no_demo:
        try:
            await _demo(address, skip_deploy=vllm is None, stopping=stopping)
        except Exception:  # the demo shows the service; it must never take it down
            log.exception("the demo could not run; the service keeps running")
    if not stopping.is_set():
        print(_banner(address, server.metrics_port, vllm.url if vllm else None), flush=True)
    await stopping.wait()
    print("stopping ...", flush=True)
    if supervisor:
        await supervisor
    await server.stop(grace=5)
    if vllm:
        await asyncio.to_thread(vllm.stop)


def _demo_command(address: str, *, skip_deploy: bool) -> list[str]:
    """``layercard --address ADDRESS demo``, run with this interpreter so it needs no console script on PATH."""
    argv = [sys.executable, "-m", "layercard_client.cli", "--address", address, "demo"]
    return [*argv, "--skip-deploy"] if skip_deploy else argv


async def _demo(address: str, *, skip_deploy: bool, stopping: asyncio.Event) -> None:
    """Runs the demo once in a subprocess, its output straight to this terminal; a failed demo is reported and
    the service keeps running. Stopping (Ctrl-C, SIGTERM) stops the demo too."""
    argv = _demo_command(address, skip_deploy=skip_deploy)
    print(f"\nrunning the demo: layercard --address {address} {' '.join(argv[5:])}", flush=True)
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


def _banner(address: str, metrics_port: int | None, vllm_url: str | None) -> str:
    lines = ["", f"layercard is serving on {address} (Ctrl-C stops it and vLLM)"]
    if metrics_port:
        lines.append(f"  metrics:  http://127.0.0.1:{metrics_port}/metrics")
    if vllm_url:
        lines.append(f"  vLLM:     {vllm_url}  (OpenAI API; model 'builtin:tiny')")
    cli = f".venv/bin/layercard --address {address}"
    lines += [
        "try, in another shell:",
        f"  {cli} health",
        f"  {cli} demo" + ("" if vllm_url else " --skip-deploy"),
        f"  {cli} card compute --model builtin:tiny --dataset builtin:cipher --probe-size 64",
        f"  {cli} card list",
        f"  {cli} plan layerCards/ID --max-step-fraction 0.6",
        f"  {cli} jobs create --model builtin:tiny --dataset builtin:cipher --adapter-id cipher "
        "--layers 4,5,6,7 --steps 300 --watch",
    ]
    if vllm_url:
        lines.append(f'  {cli} generate "The module" --stream')
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    configure_logging("INFO", "text")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
