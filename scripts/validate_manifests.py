"""Validates rendered Kubernetes manifests offline, every resource or fail.

- Built-in kinds: kubernetes-validate's schemas for one Kubernetes version, strict (an unknown field is an error,
  as it is for ``kubectl apply``'s server-side field validation).
- Custom resources: the ``openAPIV3Schema`` of a CRD vendored in ``deploy/k8s/schemas/`` (the Prometheus
  Operator's ServiceMonitor), made strict the same way. CEL rules (``x-kubernetes-validations``) are not run.
- A kind with neither is an error, not a warning: the CLI of kubernetes-validate only warns about kinds it has no
  schema for, which would let a misspelt kind or apiVersion through.

Usage: validate_manifests.py [--kubernetes-version 1.33] [--crds DIR] FILE... (scripts/check_k8s.sh runs it).
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

__all__ = ["CustomSchemas", "main", "strict_schema", "validate_documents"]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VERSION = "1.33"


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of an OpenAPI v3 schema in which objects with declared properties allow no others."""
    schema = copy.deepcopy(schema)

    def visit(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                visit(item)
            return
        if not isinstance(node, dict):
            return
        declared = "properties" in node and "additionalProperties" not in node
        if declared and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for key in ("properties", "patternProperties"):
            for child in node.get(key, {}).values():
                visit(child)
        for key in ("items", "additionalProperties", "not"):
            visit(node.get(key))
        for key in ("anyOf", "allOf", "oneOf"):
            visit(node.get(key, []))

    visit(schema)
    return schema


class CustomSchemas:
    """(apiVersion, kind) -> strict schema, from the CustomResourceDefinitions in a folder."""

    def __init__(self, folder: Path) -> None:
        self._schemas: dict[tuple[str, str], dict[str, Any]] = {}
        for path in sorted(folder.glob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if not doc or doc.get("kind") != "CustomResourceDefinition":
                    continue
                spec = doc["spec"]
                for version in spec["versions"]:
                    if version.get("served", True) and "schema" in version:
                        key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                        self._schemas[key] = strict_schema(version["schema"]["openAPIV3Schema"])

    def get(self, api_version: str, kind: str) -> dict[str, Any] | None:
        return self._schemas.get((api_version, kind))


def _name(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind', '?')}/{doc.get('metadata', {}).get('name', '?')}"


def _errors_against(schema: dict[str, Any], doc: dict[str, Any]) -> Iterator[str]:
    validator = jsonschema.Draft202012Validator(schema)
    for error in sorted(validator.iter_errors(doc), key=lambda e: list(e.path)):
        yield f"{'.'.join(str(p) for p in error.path) or '(root)'}: {error.message}"


def validate_documents(docs: list[dict[str, Any]], version: str, custom: CustomSchemas) -> tuple[list[str], int, int]:
    """Problems found (one line each), how many built-in and how many custom resources were checked."""
    problems: list[str] = []
    builtin = crs = 0
    for doc in docs:
        if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
            problems.append(f"not a Kubernetes object: {str(doc)[:80]}")
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
            builtin += 1
            continue
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path) or "(root)"
            problems.append(f"{_name(doc)}: {path}: {exc.message}")
            builtin += 1
            continue
        except kubernetes_validate.SchemaNotFoundError:
            pass
        schema = custom.get(doc["apiVersion"], doc["kind"])
        if schema is None:
            problems.append(
                f"{_name(doc)}: no schema for {doc['apiVersion']} {doc['kind']} in Kubernetes {version} or in the "
                "vendored CRDs (a misspelt kind or apiVersion, or a CRD to add to deploy/k8s/schemas/)"
            )
            continue
        crs += 1
        problems.extend(f"{_name(doc)}: {line}" for line in _errors_against(schema, doc))
    return problems, builtin, crs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="rendered manifests (multi-document YAML)")
    parser.add_argument("--kubernetes-version", default=DEFAULT_VERSION, help="default %(default)s")
    parser.add_argument("--crds", type=Path, default=ROOT / "deploy" / "k8s" / "schemas", help="vendored CRDs")
    args = parser.parse_args(argv)
    custom = CustomSchemas(args.crds)
    failed = False
    for path in args.files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        try:
            problems, builtin, crs = validate_documents(docs, args.kubernetes_version, custom)
        except kubernetes_validate.utils.VersionNotSupportedError:
            print(
                f"kubernetes-validate {kubernetes_validate.__version__} has no schemas for Kubernetes "
                f"{args.kubernetes_version}",
                file=sys.stderr,
            )
            return 2
        for line in problems:
            print(f"ERROR {path}: {line}", file=sys.stderr)
        failed |= bool(problems) or not docs
        state = "INVALID" if problems else "valid"
        print(
            f"{path}: {state}: {builtin} resources against Kubernetes {args.kubernetes_version} (strict), "
            f"{crs} custom resources against vendored CRDs"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
