"""Adapter artifacts: a trained adapter in peft format, checked for vLLM and published as a new version.

Layout: ``<artifacts>/adapters/<adapter_id>/<version>/`` with peft's ``adapter_config.json`` and weights, and
``layercard.json`` (eval metrics, training cost, placement, job). The adapter is saved into a hidden temporary
folder by the worker, and renamed into place by the service inside the database transaction that records the
version and ends the job (the worker's FinishJob), so a version is visible only complete and only together
with its successful job.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from layercard_service.errors import FailedPrecondition, InvalidArgument
from layercard_service.persistence.adapter_versions import AdapterVersion, insert_version, next_version
from layercard_service.persistence.database import Session

__all__ = ["StagedAdapter", "adapter_root", "stage_adapter", "staged_adapter_at", "vllm_problems"]


def adapter_root(artifacts: Path, adapter_id: str) -> Path:
    return artifacts / "adapters" / adapter_id


def vllm_problems(adapter_config: dict[str, Any], max_rank: int) -> list[str]:
    """Why vLLM would refuse to load this peft adapter config; empty when it loads."""
    problems = []
    rank = int(adapter_config.get("r", 0))
    if rank > max_rank:
        problems.append(f"rank {rank} is over the serving maximum {max_rank} (max_lora_rank)")
    if adapter_config.get("modules_to_save"):
        problems.append(f"modules_to_save is set ({adapter_config['modules_to_save']}); vLLM loads LoRA weights only")
    if adapter_config.get("use_dora"):
        problems.append("DoRA adapters are not supported by vLLM")
    if adapter_config.get("bias", "none") != "none":
        problems.append(f"bias is {adapter_config.get('bias')!r}; vLLM needs bias='none'")
    if adapter_config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {adapter_config.get('peft_type')!r}; vLLM loads LORA adapters only")
    return problems


class StagedAdapter:
    """An adapter saved in a temporary folder, waiting for its version number."""

    def __init__(self, root: Path, tmp: Path, adapter_id: str, job_id: str) -> None:
        self.root, self.tmp, self.adapter_id, self.job_id = root, tmp, adapter_id, job_id

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def publish(self, db: Session, metadata: dict[str, Any]) -> AdapterVersion:
        """Inside the job store's write transaction (the session ``JobStore.transition`` hands its ``result``
        callable): takes the next version number and renames into place."""
        version = next_version(db, self.adapter_id)
        final = self.root / str(version)
        if final.exists():  # left by a publication that crashed before its row was committed: no one has it
            shutil.rmtree(final)
        record = AdapterVersion(self.adapter_id, version, str(final), self.job_id, time.time(), metadata)
        (self.tmp / "layercard.json").write_text(
            json.dumps({"adapter_id": self.adapter_id, "version": version, "job_id": self.job_id, **metadata}, indent=2)
        )
        os.replace(self.tmp, final)
        insert_version(db, record)
        return record


def stage_adapter(model: Any, artifacts: Path, adapter_id: str, job_id: str, max_rank: int) -> StagedAdapter:
    """The worker's side: saves the peft model into a fresh temporary folder and checks vLLM can load it."""
    root = adapter_root(artifacts, adapter_id)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".tmp-{job_id}-*"):  # left by an earlier attempt of this job, killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    staged = StagedAdapter(root, Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{job_id}-")), adapter_id, job_id)
    try:
        model.save_pretrained(str(staged.tmp))
    except Exception:
        staged.discard()
        raise
    _check_loadable(staged, max_rank)
    return staged


def staged_adapter_at(artifacts: Path, adapter_id: str, job_id: str, path: str, max_rank: int) -> StagedAdapter:
    """The service's side: the folder a worker says it staged, checked to be one before it is published.

    Only ``<artifacts>/adapters/<adapter_id>/.tmp-<job_id>-*`` qualifies: a worker cannot make the service
    move any other folder into the adapters. InvalidArgument (field ``staged_adapter_path``) otherwise.
    """
    root = adapter_root(artifacts, adapter_id).resolve()
    tmp = Path(path).resolve()  # a symlink resolves to where it points, which is not under root
    if not (path and tmp.parent == root and tmp.name.startswith(f".tmp-{job_id}-")):
        raise InvalidArgument.field(
            "staged_adapter_path", f"must be a folder {root}/.tmp-{job_id}-* the worker staged, got {path!r}"
        )
    if not (tmp / "adapter_config.json").is_file():
        raise InvalidArgument.field("staged_adapter_path", f"{path!r} holds no staged adapter (adapter_config.json)")
    staged = StagedAdapter(root, tmp, adapter_id, job_id)
    _check_loadable(staged, max_rank)
    return staged


def _check_loadable(staged: StagedAdapter, max_rank: int) -> None:
    try:
        config = json.loads((staged.tmp / "adapter_config.json").read_text())
    except Exception:
        staged.discard()
        raise
    problems = vllm_problems(config, max_rank)
    if problems:
        staged.discard()
        raise FailedPrecondition(
            "the adapter is not loadable by vLLM: " + "; ".join(problems),
            reason="ADAPTER_INCOMPATIBLE",
            metadata={"adapter_id": staged.adapter_id},
        )
