"""Static checks of docker/k8s/: every overlay builds and validates offline, and the pieces agree.

`kubectl kustomize` builds each overlay (and the monitoring kustomization) the way `kubectl
apply -k` would; every object it emits is validated with kubernetes-validate against the
Kubernetes versions pinned below, strictly (an unknown field is an error, as a typo would
be). The other tests check what a schema cannot: that the probes reach the port the server's
health endpoint listens on, that the autoscaler asks for the metric the adapter rule serves
and that the rule reads only metrics Triton exports, that /dev/shm fits in the memory limit,
and that the init container's script seeds a shared repository once and refuses another
export.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer
from test_docker import DOCKERFILES, SERVE_TRITON, TRITON_METRICS, parse_dockerfile, promql_metric_names

from postsim.cli.main import app

yaml = pytest.importorskip("yaml", reason="pyyaml (the dev extra) reads the manifests")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "docker" / "k8s"
OVERLAYS = {"cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu"}
MONITORING = K8S / "monitoring"
TLS_COMPONENT = K8S / "components" / "tls"
SEED_SCRIPT = K8S / "base" / "seed-repository.sh"
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")
"""The oldest Kubernetes the manifests target (unhealthyPodEvictionPolicy is GA from 1.31) and the newest checked."""
MEMORY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "": 1}


def kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: `kubectl kustomize` builds the overlays")
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def with_tls(tmp_path: Path, overlay: Path) -> Path:
    """A kustomization of ``overlay`` plus the TLS component, as a user's overlay would add it."""
    directory = tmp_path / "with-tls"
    directory.mkdir()
    resources = {
        "resources": [os.path.relpath(overlay, directory)],
        "components": [os.path.relpath(TLS_COMPONENT, directory)],
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(resources), encoding="utf-8")
    return directory


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def server_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = [
        c for c in one(objects, "Deployment")["spec"]["template"]["spec"]["containers"] if c["name"] == "postsim"
    ]
    return container


def quantity_bytes(value: str) -> int:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|)", str(value))
    assert match, value
    return int(match.group(1)) * MEMORY_UNITS[match.group(2)]


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, kustomize(OVERLAYS[request.param])


# ---------------------------------------------------------------------------------------
# Every object validates


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", [*sorted(OVERLAYS), "monitoring", "cpu+tls"])
def test_every_object_validates_against_the_kubernetes_schemas(name: str, version: str, tmp_path: Path) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (the dev extra)")
    directory = {"monitoring": MONITORING, "cpu+tls": with_tls(tmp_path, OVERLAYS["cpu"])}.get(name, OVERLAYS.get(name))
    assert directory is not None
    objects = kustomize(directory)
    assert objects, f"{name} builds no object"
    for manifest in objects:
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name}: {manifest['kind']} {manifest['metadata']['name']} is invalid on {version}: {error}")


def test_validation_catches_what_it_is_here_to_catch(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (the dev extra)")
    deployment = json.loads(json.dumps(one(overlay[1], "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/typo"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


# ---------------------------------------------------------------------------------------
# Probes on the server's health port


def test_probes_ask_the_health_port_for_the_images_health_endpoints(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    container = server_container(overlay[1])
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["http"] == 8000 and ports["grpc"] == 8001 and ports["metrics"] == 8002
    health_args = [arg for arg in container["args"] if arg.startswith("--health-address=")]
    assert health_args == [f"--health-address=0.0.0.0:{ports['health']}"], "the pod's address, where the kubelet probes"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "health", probe
    assert container["readinessProbe"]["httpGet"]["path"] == container["startupProbe"]["httpGet"]["path"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    # The path the image's own HEALTHCHECK asks for, and the time it gives a start.
    (healthcheck,) = parse_dockerfile(DOCKERFILES[overlay[0]]).runtime.all("HEALTHCHECK")
    assert container["readinessProbe"]["httpGet"]["path"] in healthcheck.args
    start_period = re.search(r"--start-period=(\d+)s", healthcheck.args)
    assert start_period, healthcheck.args
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] == int(start_period.group(1))


def _entrypoint_serve_args(kind: str) -> list[str] | None:
    """The options each image passes to `postsim serve` before the container's own arguments, or None."""
    if kind == "cpu":
        (entrypoint,) = parse_dockerfile(DOCKERFILES["cpu"]).runtime.all("ENTRYPOINT")
        command = json.loads(entrypoint.args)
        assert command[:2] == ["postsim", "serve"]
        return list(command[2:])
    script = SERVE_TRITON.read_text(encoding="utf-8")
    match = re.search(r"^exec postsim serve((?:.*\\\n)*.*)$", script, re.MULTILINE)
    if match is None:
        return None
    words = shlex.split(match.group(1).replace("\\\n", " "))
    assert words[-1] == "$@", "the container's arguments must come last, or they cannot override the script's"
    return [word for word in words[:-1] if "$" not in word]


@pytest.mark.parametrize("kind", sorted(OVERLAYS))
def test_the_containers_arguments_move_the_health_port_onto_the_pods_address(kind: str) -> None:
    serve = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    if "health_address" not in {param.name for param in serve.params}:
        pytest.skip("postsim serve has no plaintext health port yet (the front end of branch fix-server)")
    image_args = _entrypoint_serve_args(kind)
    if image_args is None:
        pytest.skip("the GPU image does not run postsim serve yet (branch fix-server)")
    container = server_container(kustomize(OVERLAYS[kind]))
    context = serve.make_context("serve", [*image_args, *container["args"]])
    health = next(port["containerPort"] for port in container["ports"] if port["name"] == "health")
    assert context.params["health_address"] == f"0.0.0.0:{health}"


# ---------------------------------------------------------------------------------------
# Autoscaling on Triton's queue time


def adapter_rules() -> list[dict[str, Any]]:
    config_map = one(kustomize(MONITORING), "ConfigMap")
    return yaml.safe_load(config_map["data"]["config.yaml"])["rules"]


def test_the_autoscaler_asks_for_the_metric_the_adapter_rule_serves(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    hpa = one(overlay[1], "HorizontalPodAutoscaler")
    deployment = one(overlay[1], "Deployment")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods", "a latency per pod, not CPU"
    served = {rule["name"]["as"] for rule in adapter_rules()}
    assert metric["pods"]["metric"]["name"] in served
    assert hpa["spec"]["minReplicas"] >= 2, "the PodDisruptionBudget lets one replica go: one must stay"
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"


def test_the_adapter_rule_reads_triton_queue_time_per_request_for_each_pod() -> None:
    (rule,) = adapter_rules()
    query = rule["metricsQuery"].replace("<<.LabelMatchers>>", 'pod="p"').replace("<<.GroupBy>>", "pod")
    assert promql_metric_names(query) == {"nv_inference_queue_duration_us", "nv_inference_request_success"}
    assert promql_metric_names(query) <= TRITON_METRICS
    assert promql_metric_names(rule["seriesQuery"]) == {"nv_inference_queue_duration_us"}
    overrides = rule["resources"]["overrides"]
    assert overrides["pod"] == {"resource": "pod"} and overrides["namespace"] == {"resource": "namespace"}
    assert re.search(r"max by \(<<\.GroupBy>>\)", rule["metricsQuery"]), "the bottleneck model of each pod"


def test_the_adapter_values_read_the_rules_configmap() -> None:
    values = yaml.safe_load((MONITORING / "prometheus-adapter-values.yaml").read_text(encoding="utf-8"))
    config_map = one(kustomize(MONITORING), "ConfigMap")
    assert values["rules"]["existing"] == config_map["metadata"]["name"]


def test_metrics_are_scraped_where_the_server_serves_them(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    template = one(overlay[1], "Deployment")["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    metrics_port = next(p["containerPort"] for p in server_container(overlay[1])["ports"] if p["name"] == "metrics")
    assert annotations["prometheus.io/port"] == str(metrics_port) and annotations["prometheus.io/path"] == "/metrics"
    service = one(overlay[1], "Service", "postsim-metrics")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["metrics"]


# ---------------------------------------------------------------------------------------
# Pods, Services and the disruption budget agree


def test_services_and_the_disruption_budget_select_the_server_pods(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    objects = overlay[1]
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    port_names = {port["name"] for port in server_container(objects)["ports"]}
    for service in (o for o in objects if o["kind"] == "Service"):
        assert service["spec"]["selector"].items() <= pod_labels.items(), service["metadata"]["name"]
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names, service["metadata"]["name"]
    assert one(objects, "Service", "postsim-replicas")["spec"]["clusterIP"] == "None", "one DNS record per replica"
    budget = one(objects, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_shared_memory_is_memory_backed_and_fits_the_memory_limit(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    spec = one(overlay[1], "Deployment")["spec"]["template"]["spec"]
    container = server_container(overlay[1])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    shm = quantity_bytes(volume["emptyDir"]["sizeLimit"])
    assert shm >= 2**30, "Triton's Python backend needs at least 1 GiB (README)"
    limits = container["resources"]["limits"]
    assert shm < quantity_bytes(limits["memory"]), "tmpfs pages count against the container's memory limit"
    assert container["resources"]["requests"]["memory"] == limits["memory"]


def test_only_the_gpu_overlay_asks_for_a_gpu(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, objects = overlay
    resources = server_container(objects)["resources"]
    gpus = resources["limits"].get("nvidia.com/gpu")
    assert gpus == ("1" if name == "gpu" else None)
    assert server_container(objects)["image"].endswith(f":{name}")


def test_every_replica_serves_the_shared_repository_seeded_by_the_init_container(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    objects = overlay[1]
    spec = one(objects, "Deployment")["spec"]["template"]["spec"]
    claim = one(objects, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    (volume,) = [v for v in spec["volumes"] if "persistentVolumeClaim" in v]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    (mount,) = [m for m in server_container(objects)["volumeMounts"] if m["name"] == volume["name"]]
    (init,) = spec["initContainers"]
    (seed_mount,) = [m for m in init["volumeMounts"] if m["name"] == volume["name"]]
    env = {e["name"]: e["value"] for e in init["env"]}
    assert mount["mountPath"] == env["POSTSIM_IMAGE_REPOSITORY"] == "/models", "where both images serve from"
    assert env["POSTSIM_SHARED_REPOSITORY"] == f"{seed_mount['mountPath']}/{mount['subPath']}"
    assert init["image"] == server_container(objects)["image"], "the image's own export is what gets seeded"


# ---------------------------------------------------------------------------------------
# The init container's script


def _seed(tmp_path: Path, image: Path, shared: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "POSTSIM_IMAGE_REPOSITORY": str(image), "POSTSIM_SHARED_REPOSITORY": str(shared)}
    return subprocess.run(["sh", str(SEED_SCRIPT)], env=env, capture_output=True, text=True, timeout=30, cwd=tmp_path)


def _export(path: Path, fingerprint: str) -> Path:
    (path / "fuser" / "1").mkdir(parents=True)
    (path / "fuser" / "1" / "model.onnx").write_bytes(b"onnx")
    (path / "weights.json").write_text(json.dumps({"fingerprint": fingerprint}), encoding="utf-8")
    return path


def test_seeding_copies_the_image_repository_once_and_keeps_what_was_published(tmp_path: Path) -> None:
    image = _export(tmp_path / "image", "aaaa")
    shared = tmp_path / "volume" / "model_repository"
    shared.parent.mkdir()
    first = _seed(tmp_path, image, shared)
    assert first.returncode == 0, first.stderr
    assert (shared / "fuser" / "1" / "model.onnx").read_bytes() == b"onnx"
    assert [p.name for p in shared.parent.iterdir()] == ["model_repository"], "no staging folder left behind"
    (shared / "retrieval" / "1").mkdir(parents=True)  # an index published since
    again = _seed(tmp_path, image, shared)
    assert again.returncode == 0, again.stderr
    assert (shared / "retrieval" / "1").is_dir()


def test_seeding_refuses_a_volume_that_holds_another_export(tmp_path: Path) -> None:
    shared = _export(tmp_path / "volume" / "model_repository", "aaaa")
    result = _seed(tmp_path, _export(tmp_path / "image", "bbbb"), shared)
    assert result.returncode == 1
    assert "another export" in result.stderr and "new claim" in result.stderr
    assert json.loads((shared / "weights.json").read_text(encoding="utf-8")) == {"fingerprint": "aaaa"}


def test_seeding_refuses_a_folder_that_is_no_repository(tmp_path: Path) -> None:
    shared = tmp_path / "volume" / "model_repository"
    (shared / "something").mkdir(parents=True)
    result = _seed(tmp_path, _export(tmp_path / "image", "aaaa"), shared)
    assert result.returncode == 1 and "holds no weights.json" in result.stderr
    assert not (shared / "fuser").exists()


def test_seed_script_passes_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    result = subprocess.run([shellcheck, "-s", "sh", str(SEED_SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# ---------------------------------------------------------------------------------------
# Milvus's chart values and the walk-through


@pytest.mark.parametrize("kind", sorted(OVERLAYS))
def test_milvus_values_are_values_for_the_chart_not_a_copy_of_it(kind: str) -> None:
    values = yaml.safe_load((OVERLAYS[kind] / "milvus-values.yaml").read_text(encoding="utf-8"))
    assert "apiVersion" not in values and "kind" not in values
    assert values["cluster"]["enabled"] is True
    tag = values["image"]["all"]["tag"]
    assert re.fullmatch(r"v2\.6\.\d+(-gpu)?", tag), "pinned to a release"
    assert "authorizationEnabled: true" in values["extraConfigFiles"]["user.yaml"]
    for node in ("queryNode", "dataNode"):
        gpus = values[node]["resources"]["limits"].get("nvidia.com/gpu") if kind == "gpu" else None
        assert gpus == ("1" if kind == "gpu" else None), node
    assert tag.endswith("-gpu") == (kind == "gpu")


def test_docs_name_only_files_that_exist() -> None:
    readme = (ROOT / "docker" / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"docker/k8s/[\w./-]+", readme))
    assert named, "docker/README.md walks through docker/k8s"
    missing = sorted(path for path in named if not (ROOT / path.rstrip(".")).exists())
    assert not missing, missing
