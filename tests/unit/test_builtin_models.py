"""Built-in model names: shipped ones resolve to the package, imported ones need a whole import in the cache."""

from __future__ import annotations

import json

import pytest

from layercard_service.errors import FailedPrecondition, NotFound
from layercard_service.models.builtin import MANIFEST_NAME, builtin_model, builtin_model_path
from layercard_service.models.materialize import main as materialize_main


def test_shipped_model_resolves_to_the_package():
    assert (builtin_model_path("builtin:tiny") / "config.json").is_file()


def test_unknown_name_is_not_found_and_lists_the_known_ones():
    with pytest.raises(NotFound, match="builtin:smollm2-135m, builtin:tiny"):
        builtin_model_path("builtin:nope")


def test_an_empty_cache_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERCARD_MODEL_CACHE", str(tmp_path))
    with pytest.raises(FailedPrecondition, match=r"models\.materialize smollm2-135m") as caught:
        builtin_model_path("builtin:smollm2-135m")
    assert caught.value.reason == "BUILTIN_MODEL_NOT_MATERIALIZED"


def _fake_import(root, sha256, size):
    folder = root / "smollm2-135m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    files = [{"name": "config.json", "bytes": size, "sha256": "x"}]
    (folder / MANIFEST_NAME).write_text(json.dumps({"source_sha256": sha256, "files": files}))
    return folder


def test_a_whole_import_resolves(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERCARD_MODEL_CACHE", str(tmp_path))
    folder = _fake_import(tmp_path, builtin_model("smollm2-135m").gguf.sha256, 2)
    assert builtin_model_path("smollm2-135m") == folder


@pytest.mark.parametrize(
    ("sha_ok", "size", "problem"),
    [(False, 2, "another source file"), (True, 3, "has 2 bytes, the manifest says 3")],
)
def test_a_stale_or_partial_import_is_refused(tmp_path, monkeypatch, sha_ok, size, problem):
    monkeypatch.setenv("LAYERCARD_MODEL_CACHE", str(tmp_path))
    _fake_import(tmp_path, builtin_model("smollm2-135m").gguf.sha256 if sha_ok else "0" * 64, size)
    with pytest.raises(FailedPrecondition, match=problem):
        builtin_model_path("smollm2-135m")


def test_materialize_refuses_a_gguf_with_another_hash(tmp_path, capsys):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not the pinned file")
    assert materialize_main(["--gguf", str(gguf), "--out", str(tmp_path / "out"), "--sha256", "0" * 64]) == 1
    assert "not the pinned one" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
