"""Inline datasets as artifacts: a job's inline JSONL is stored once, by hash, never in its record.

CreateTuningJob writes the bytes to ``<data-dir>/artifacts/datasets/<sha256>.jsonl`` and the job's spec keeps
only the hash and the size, so job records (and the responses made from them) stay small whatever the data.
The worker reads the bytes back and checks the hash. Equal datasets share one file; deleting a job removes the
file once no other job refers to it (``JobStore.delete`` decides, inside its transaction).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from pathlib import Path

from layercard_service.data.sources import DatasetRequest
from layercard_service.errors import FailedPrecondition
from layercard_service.persistence.store import atomic_write

__all__ = ["DatasetArtifacts"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class DatasetArtifacts:
    """Content-addressed JSONL files under ``<artifacts>/datasets``."""

    def __init__(self, artifacts: Path) -> None:
        self.root = Path(artifacts) / "datasets"

    def path(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):  # a hash from a record, never a path a caller chose
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / f"{sha256}.jsonl"

    def put(self, data: bytes) -> str:
        """Stores ``data`` (once: an equal file already there is kept); returns its hash."""
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.path(sha256)
        if not (path.is_file() and path.stat().st_size == len(data)):
            atomic_write(path, data)
        return sha256

    def read(self, sha256: str, size_bytes: int, field: str) -> bytes:
        """The bytes stored under ``sha256``; FAILED_PRECONDITION when they are gone or do not match."""
        path = self.path(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise FailedPrecondition(
                f"{field}: the stored inline dataset {sha256} is missing from {self.root}",
                reason="DATASET_ARTIFACT_MISSING",
                metadata={"sha256": sha256},
            ) from exc
        if len(data) != size_bytes or hashlib.sha256(data).hexdigest() != sha256:
            raise FailedPrecondition(
                f"{field}: the stored inline dataset {sha256} does not match its hash (corrupted)",
                reason="DATASET_ARTIFACT_CORRUPT",
                metadata={"sha256": sha256},
            )
        return data

    def remove(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    # --- requests <-> references ------------------------------------------------------------------------------
    def store(self, request: DatasetRequest | None) -> DatasetRequest | None:
        """The request as a job keeps it: inline bytes replaced by their hash and size (after storing them)."""
        if request is None or request.inline_jsonl is None:
            return request
        sha256 = self.put(request.inline_jsonl)
        return replace(request, inline_jsonl=None, inline_sha256=sha256, inline_size_bytes=len(request.inline_jsonl))

    def ensure(self, request: DatasetRequest | None) -> None:
        """Stores a request's inline bytes again if their file is gone.

        Called once the job's row is in: a delete of the last job using the same data may have removed the file
        between ``store`` and the insert; after the insert no delete can, as the new row refers to it.
        """
        if request is not None and request.inline_jsonl is not None:
            self.put(request.inline_jsonl)

    def load(self, request: DatasetRequest | None, field: str) -> DatasetRequest | None:
        """The request with its inline bytes read back (records from before artifacts still hold the bytes)."""
        if request is None or request.inline_jsonl is not None or not request.inline_sha256:
            return request
        return replace(request, inline_jsonl=self.read(request.inline_sha256, request.inline_size_bytes, field))
