"""The trainer Job's manifest: valid against a current Kubernetes API (kubernetes-validate, strict: unknown
fields fail too) for CPU and multi-GPU settings; the worker's command reused as the local runner builds it, plus
the service's address; its credential from a Secret of its own; no dependency on state.db (no colocation with
the service pod); the ``k8s_*`` settings read, checked and turned into the manifest."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import kubernetes_validate
import pytest

from layercard_service.config import ConfigError, ServiceConfig
from layercard_service.runners.kubernetes.manifest import (
    KubernetesSettings,
    job_label,
    job_manifest,
    job_name,
    parse_toleration,
    worker_secret,
)
from layercard_service.runners.kubernetes.runner import trainer_threads
from layercard_service.runners.local import worker_command
from layercard_service.trainer import worker

KUBERNETES_VERSION = "1.37.0"  # the newest schemas kubernetes-validate 1.37 ships

COMMAND = worker_command(Path("/data"), (Path("/models"),), (Path("/data/datasets"),), 16, threads=4)
DATA = Path("/data")  # the service's data_dir: the data volume's mount path in the trainer pods
ADDRESS = "layercard.ml.svc:50051"
CPU = KubernetesSettings(namespace="ml", trainer_image="registry.example/layercard-trainer:0.1.0",
                         data_claim="layercard-data", service_address=ADDRESS)  # fmt: skip
GPU = KubernetesSettings(
    namespace="ml",
    trainer_image="registry.example/layercard-trainer:0.1.0-cuda",
    data_claim="layercard-data",
    service_address=ADDRESS,
    service_account="layercard-trainer",
    gpus=2,
    cpu_request="8",
    cpu_limit="16",
    memory_request="64Gi",
    memory_limit="64Gi",
    node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "pool": "gpu"},
    tolerations=(parse_toleration("nvidia.com/gpu:NoSchedule"), parse_toleration("dedicated=ml:NoExecute")),
    read_only_claims=(("models", Path("/models")),),
    active_deadline_seconds=86_400,
    ttl_seconds_after_finished=3600,
)


def _validate(manifest: dict) -> None:
    kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def _container(manifest: dict) -> dict:
    return manifest["spec"]["template"]["spec"]["containers"][0]


def test_the_cpu_job_is_valid_and_runs_the_worker_as_the_local_runner_would():
    manifest = job_manifest("job-a", CPU, COMMAND, data_dir=DATA)
    _validate(manifest)
    argv = COMMAND("job-a")
    container = _container(manifest)
    # The same arguments, the image's interpreter, and where to report: the service's in-cluster address.
    assert container["command"] == ["python", *argv[1:], "--service-address", ADDRESS]
    assert container["command"][1:3] == ["-m", "layercard_service.trainer.worker"]
    assert container["resources"] == {"requests": {"cpu": "1", "memory": "4Gi"}}
    labels = manifest["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "layercard-trainer" and labels["layercard.dev/job-id"] == "job-a"
    assert manifest["spec"]["template"]["metadata"]["labels"] == labels
    spec = manifest["spec"]
    assert spec["backoffLimit"] == 0 and spec["ttlSecondsAfterFinished"] == 86_400
    assert "activeDeadlineSeconds" not in spec
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"] is True
    assert pod["volumes"] == [{"name": "data", "persistentVolumeClaim": {"claimName": "layercard-data"}}]
    assert container["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]  # the service's data_dir
    assert not {"serviceAccountName", "nodeSelector", "tolerations", "affinity"} & set(pod)
    env = {e["name"]: e for e in container["env"]}
    token = env["LAYERCARD_WORKER_TOKEN"]
    assert token == {"name": "LAYERCARD_WORKER_TOKEN",
                     "valueFrom": {"secretKeyRef": {"name": job_name("job-a"), "key": "token"}}}  # fmt: skip
    assert not any("token" in arg.lower() for arg in container["command"])  # never in argv


def test_the_job_does_not_depend_on_the_database_or_the_service_pods_node():
    """Workers report through the service: nothing in the Job pins it near state.db or names the database."""
    for settings in (CPU, GPU):
        manifest = job_manifest("job-a", settings, COMMAND, data_dir=DATA)
        pod = manifest["spec"]["template"]["spec"]
        assert "affinity" not in pod  # no podAffinity to the service pod: any node will do
        assert "state.db" not in str(manifest)
        assert "--service-address" in _container(manifest)["command"]


def test_the_worker_credential_secret_is_valid_and_named_as_the_job():
    secret = worker_secret("job-a", "s3cret", CPU)
    _validate(secret)
    assert secret["metadata"]["name"] == job_name("job-a") and secret["metadata"]["namespace"] == "ml"
    assert secret["stringData"] == {"token": "s3cret"} and secret["type"] == "Opaque"
    assert secret["metadata"]["annotations"]["layercard.dev/job-id"] == "job-a"


def test_the_multi_gpu_job_is_valid_and_launches_through_torchrun():
    manifest = job_manifest("job-a", GPU, COMMAND, data_dir=DATA)
    _validate(manifest)
    container = _container(manifest)
    launch = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "layercard_service.trainer.worker"]
    assert container["command"] == [*launch, *COMMAND("job-a")[3:], "--service-address", ADDRESS]
    assert container["resources"] == {
        "requests": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "2"},
        "limits": {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "2"},
    }
    pod = manifest["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "layercard-trainer"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "pool": "gpu"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"},
    ]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True and "/dev/shm" in mounts  # NCCL needs more than 64 MiB
    assert "affinity" not in pod  # trainers need not share the service pod's node
    assert manifest["spec"]["activeDeadlineSeconds"] == 86_400


def test_one_gpu_needs_no_launcher():
    manifest = job_manifest("job-a", replace(GPU, gpus=1), COMMAND, data_dir=DATA)
    _validate(manifest)
    assert _container(manifest)["command"][:3] == ["python", "-m", "layercard_service.trainer.worker"]
    assert _container(manifest)["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_each_rank_gets_its_share_of_the_pods_cores():
    # torchrun starts one worker per GPU in the pod: N ranks of all the cores each would oversubscribe them N times.
    assert trainer_threads(GPU) == 8  # 16 cores (the limit), 2 ranks
    assert trainer_threads(replace(GPU, gpus=1)) == 16 and trainer_threads(CPU) == 1
    assert trainer_threads(replace(GPU, gpus=32)) == 1


def test_the_validator_does_refuse_a_broken_job():
    manifest = job_manifest("job-a", CPU, COMMAND, data_dir=DATA)
    manifest["spec"]["template"]["spec"]["restartPolicy"] = ["Never"]
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(manifest)
    manifest = job_manifest("job-a", CPU, COMMAND, data_dir=DATA)
    manifest["spec"]["backofLimit"] = 0  # a typo: strict validation knows every field
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(manifest)


@pytest.mark.parametrize("job_id", ["a", "job-ends-in-dash-", "x" * 63, "j" + "-" * 62])
def test_any_job_id_gives_a_valid_name_and_label(job_id):
    manifest = job_manifest(job_id, CPU, COMMAND, data_dir=DATA)
    _validate(manifest)
    name, label = job_name(job_id), job_label(job_id)
    assert len(name) <= 63 and name[-1].isalnum() and len(label) <= 63 and label[-1].isalnum()
    assert manifest["metadata"]["annotations"]["layercard.dev/job-id"] == job_id  # the exact id, always
    assert job_name(job_id + "x") != name


def test_settings_from_flags_and_environment(tmp_path):
    namespace_file = tmp_path / "namespace"
    namespace_file.write_text("team-ml\n")
    env = {
        "LAYERCARD_JOB_RUNNER": "kubernetes",
        "LAYERCARD_DATA_DIR": "/data",
        "LAYERCARD_K8S_TRAINER_IMAGE": "trainer:1",
        "LAYERCARD_K8S_DATA_CLAIM": "layercard-data",
        "LAYERCARD_K8S_SERVICE_ADDRESS": ADDRESS,
        "LAYERCARD_K8S_NODE_SELECTOR": "pool=gpu, zone=a",
        "LAYERCARD_K8S_TOLERATIONS": "nvidia.com/gpu:NoSchedule,spot",
    }
    config = ServiceConfig.load(["--k8s-gpus", "2", "--k8s-read-only-claims", "models=/models"], environ=env)
    settings = config.kubernetes.resolved(namespace_file)
    assert settings.namespace == "team-ml"  # the service pod's own namespace
    assert (settings.gpus, settings.node_selector) == (2, {"pool": "gpu", "zone": "a"})
    assert settings.tolerations == (
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "spot", "operator": "Exists"},
    )
    assert settings.read_only_claims == (("models", Path("/models")),)
    assert settings.service_address == ADDRESS
    assert config.kubernetes.resolved(tmp_path / "absent").namespace == "default"
    _validate(job_manifest("job-a", settings, COMMAND, data_dir=DATA))


def test_the_local_runner_stays_the_default():
    config = ServiceConfig.load([], environ={})
    assert config.job_runner == "local"
    ServiceConfig.load(["--k8s-cpu-request", "lots"], environ={})  # k8s_* settings are checked only when used


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--job-runner", "slurm"], "job_runner"),
        (["--k8s-trainer-image", ""], "k8s_trainer_image"),
        (["--k8s-data-claim", ""], "k8s_data_claim"),
        (["--data-dir", "relative/dir"], "absolute"),
        (["--k8s-namespace", "Team_ML"], "k8s_namespace"),
        (["--k8s-cpu-request", "lots"], "k8s_cpu_request"),
        (["--k8s-memory-limit", "8GB"], "k8s_memory_limit"),
        (["--k8s-gpus", "-1"], "k8s_gpus"),
        (["--k8s-gpu-resource", "gpu"], "k8s_gpu_resource"),
        (["--k8s-node-selector", "pool"], "key=value"),
        (["--k8s-tolerations", "gpu:Never"], "effect"),
        (["--k8s-read-only-claims", "models"], "claim=/mount/path"),
        (["--k8s-run-as-user", "0"], "non-root"),
        (["--k8s-poll-seconds", "0"], "k8s_poll_seconds"),
        (["--k8s-service-address", ""], "k8s_service_address"),
        (["--k8s-service-address", "layercard.ml.svc"], "k8s_service_address"),
        (["--k8s-service-address", "layercard.ml.svc:http"], "k8s_service_address"),
        (["--k8s-service-address", ":50051"], "k8s_service_address"),
    ],
)
def test_bad_kubernetes_settings_are_refused(argv, message):
    base = ["--job-runner", "kubernetes", "--data-dir", "/data", "--k8s-trainer-image", "trainer:1"]
    base += ["--k8s-service-address", ADDRESS]
    with pytest.raises(ConfigError, match=message):
        ServiceConfig.load([*base, "--k8s-data-claim", "layercard-data", *argv], environ={})


def test_a_bad_torchrun_environment_is_refused_before_anything_opens(tmp_path, monkeypatch):
    # Every rank trains now (trainer/distributed.py, tests/unit/test_ddp.py); a rank outside its world is a bug.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert worker.main(["--data-dir", str(tmp_path / "data"), "--job-id", "job-a"]) == 2
    assert not (tmp_path / "data").exists()  # it never opened the job store
