"""Generates every model's ``config.pbtxt`` from the tensor contract.

Configs are built as tritonclient's ``ModelConfig`` protobuf messages and written with
protobuf's text format, so a config that does not parse cannot be written. Two targets
share model and tensor names:

- ``embedded``: every model is a Python-backend model; the ONNX ones are run by ONNX
  Runtime inside the stub (the ``tritonserver`` binary of the nvidia-pytriton wheel has no
  onnxruntime backend). CPU, or the CUDA execution provider where a GPU is present.
- ``triton``: the production target for the NGC container. The ONNX models use Triton's
  native ``onnxruntime`` backend on the GPU with the TensorRT accelerator in FP16.

Nothing here imports torch: ``postsim index publish`` writes the retrieval config too.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as pb

from postsim.core.errors import RepositoryError
from postsim.core.files import write_text_atomic
from postsim.model_repository import contract
from postsim.model_repository.configs import parse_pbtxt, to_pbtxt
from postsim.model_repository.contract import ModelSpec, TensorSpec
from postsim.model_repository.layout import CONFIG_NAME, Target
from postsim.model_repository.milvus_store import require_pymilvus


class ThreadPolicy(enum.Enum):
    """How many ONNX Runtime intra-op threads each embedded ONNX session runs (idle pool threads sleep in every one).

    A policy is a setting of :attr:`ServingSettings.intra_op_threads` and
    :attr:`ServingSettings.lone_post_threads`: ``postsim bench serve --thread-policy`` serves
    one copy of the repository per policy and compares them in the same run. At concurrency 1
    the image path is the longest (ResNet-101 against DistilBERT), so a second thread for
    ``image_encoder`` uses the core left idle; under load both cores are busy anyway and a
    second thread can only fight. ``lone-post`` gives the second thread only while one post is in the server.
    """

    ONE = "one"
    """One thread per session: the encoders and the two image_encoder instances share the cores."""
    IMAGE_TWO = "image-two"
    """Two threads for image_encoder (the longer path of a post), one for the others."""
    ENCODERS_TWO = "encoders-two"
    """Two threads for image_encoder and text_encoder, one for the fuser."""
    LONE_POST = "lone-post"
    """One thread per session, and two for image_encoder while its request is the only inference call
    the server runs (the front end's count)."""

    @property
    def intra_op_threads(self) -> dict[str, int]:
        image = 2 if self in (ThreadPolicy.IMAGE_TWO, ThreadPolicy.ENCODERS_TWO) else 1
        text = 2 if self is ThreadPolicy.ENCODERS_TWO else 1
        return {contract.IMAGE_ENCODER: image, contract.TEXT_ENCODER: text, contract.FUSER: 1}

    @property
    def lone_post_threads(self) -> dict[str, int]:
        return {contract.IMAGE_ENCODER: 2} if self is ThreadPolicy.LONE_POST else {}


DEFAULT_THREAD_POLICY = ThreadPolicy.LONE_POST
"""The embedded target's default (:class:`ServingSettings`): ``one`` under load, a second thread for a lone post
(README's Performance section has the comparison)."""


@dataclass(frozen=True, kw_only=True)
class ServingSettings:
    """How the server schedules each model: batching, instances, threads.

    The defaults are measured for the embedded target on CPU (2-core AMD EPYC, full-size
    models, ``postsim bench serve``; the numbers are in bench/TUNING.md). There a model's
    CPU time per post does not shrink with the batch size, so batching only has to spread
    the work over the instances, and every ONNX Runtime session runs on one thread: with
    more, the encoders' spinning thread pools fight over the cores (server CPU per post
    ~290 ms with ONNX Runtime's default threads, ~130 ms with one). The one exception is
    :attr:`lone_post_threads`: image_encoder takes two threads while its post is the only one
    in the server. For the ``triton`` target (GPU, TensorRT), use :meth:`for_target`.
    """

    max_queue_delay_us: int = 500
    """How long the dynamic batcher waits to fill a batch. On CPU waiting buys nothing (see
    above); 500 µs costs at most 1.5 ms over the three batched stages of a lone request."""
    preferred_batch_sizes: tuple[int, ...] = (4,)
    """Batch sizes the batcher forms when enough requests wait. Capping batches at 4 lets a
    queue be split over both image_encoder instances instead of going to one as a batch of
    16 (best runs at c=4: 15.2 posts/s, against 10.7 with no preferred size and 11.5 with
    (4, 8, 16), both instances each time)."""
    instances: Mapping[str, int] = field(default_factory=lambda: {contract.IMAGE_ENCODER: 2})
    """Instance count per model; models not named get one instance. ResNet-101 takes ~75 of
    the ~125 CPU ms a post costs: one single-threaded instance caps the server at ~13
    posts/s, two let it use both cores. preprocess_image (~5 ms/post) and text_encoder
    (~35 ms/post) keep up with one each."""
    intra_op_threads: Mapping[str, int] = field(default_factory=lambda: DEFAULT_THREAD_POLICY.intra_op_threads)
    """ONNX Runtime intra-op threads per model (embedded target); 0 or absent = ONNX Runtime's
    choice (one per core, spinning). The default is :data:`DEFAULT_THREAD_POLICY`'s; see
    :class:`ThreadPolicy` for the measured alternatives."""

    lone_post_threads: Mapping[str, int] = field(default_factory=lambda: DEFAULT_THREAD_POLICY.lone_post_threads)
    """Intra-op threads per model while its request is the only call the server runs (a second
    session of the model); absent or not above ``intra_op_threads``: no second session."""

    intra_op_spinning: bool = contract.INTRA_OP_SPINNING_PARAMETER.default
    """Whether idle ONNX Runtime pool threads spin (ONNX Runtime's default) or sleep. Spinning
    buys microseconds per operator when a session has the cores to itself; beside the other
    models' processes it burns the cores they need."""

    def with_thread_policy(self, policy: ThreadPolicy) -> ServingSettings:
        """These settings with ``policy``'s threads per session, idle pool threads sleeping."""
        return replace(
            self,
            intra_op_threads=policy.intra_op_threads,
            lone_post_threads=policy.lone_post_threads,
            intra_op_spinning=False,
        )

    def instance_count(self, model: str) -> int:
        return self.instances.get(model, 1)

    def session_parameters(self, model: str) -> dict[str, str]:
        """The config parameters with which an embedded ONNX model sets up its ONNX Runtime session."""
        threads, spinning = contract.INTRA_OP_THREADS_PARAMETER, contract.INTRA_OP_SPINNING_PARAMETER
        lone_post = contract.LONE_POST_THREADS_PARAMETER
        return {
            threads.key: threads.as_text(self.intra_op_threads.get(model, threads.default)),
            spinning.key: spinning.as_text(self.intra_op_spinning),
            lone_post.key: lone_post.as_text(self.lone_post_threads.get(model, lone_post.default)),
        }

    @classmethod
    def for_target(cls, target: Target) -> ServingSettings:
        """The defaults for ``target``: the measured CPU ones for ``embedded``; for ``triton``
        (GPU, TensorRT, where larger batches do pay) the batching it had before, unmeasured here."""
        if target is Target.TRITON:
            return cls(
                max_queue_delay_us=2000,
                preferred_batch_sizes=(4, 8, 16),
                instances={contract.PREPROCESS_IMAGE: 2, contract.TOKENIZE: 1},
                intra_op_threads={},
                lone_post_threads={},
            )
        return cls()


@dataclass(frozen=True, kw_only=True)
class InputLimits:
    """What one post may cost the server: written as parameters of the models that enforce them.

    Every post comes from an untrusted client; these bound the work and memory one request
    can take before anything is decoded (``preprocess_image``), tokenised (``tokenize``) or
    searched (``retrieval``). Each field is the config parameter of the same key
    (``contract.INPUT_LIMIT_PARAMETERS``), written into the config of every model whose spec
    reads it and read back by ``postsim.model_repository.backend_models``.
    """

    max_image_bytes: int = contract.MAX_IMAGE_BYTES
    """Largest encoded image accepted (``preprocess_image``)."""
    max_image_pixels: int = contract.MAX_IMAGE_PIXELS
    """Largest width × height accepted, read from the image header before decoding."""
    max_text_chars: int = contract.MAX_TEXT_CHARS
    """Characters of a text kept before tokenising (``tokenize``); the rest is never decoded."""
    max_top_k: int = contract.MAX_TOP_K
    """Largest ``TOP_K`` a similar_posts request may ask for (``retrieval``)."""
    video_frames: int = contract.VIDEO_FRAMES
    """Frames F sampled from a video post (``preprocess_image``); the image encoder runs on each."""
    max_video_bytes: int = contract.MAX_VIDEO_BYTES
    """Largest encoded video accepted."""
    max_video_seconds: int = contract.MAX_VIDEO_SECONDS
    """Longest video accepted, from its container's header."""
    max_video_pixels: int = contract.MAX_VIDEO_PIXELS
    """Largest video frame (width × height) accepted, from the header."""
    max_video_frame_rate: int = contract.MAX_VIDEO_FRAME_RATE
    """Highest average frame rate accepted (frames per second)."""
    max_animation_pixels: int = contract.MAX_ANIMATION_PIXELS
    """Largest frames × canvas pixels of an animated GIF or WebP."""
    video_decode_seconds: int = contract.VIDEO_DECODE_SECONDS
    """Wall-clock budget of decoding one video."""

    def __post_init__(self) -> None:
        for parameter in contract.INPUT_LIMIT_PARAMETERS:
            value = getattr(self, parameter.key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise RepositoryError(f"InputLimits.{parameter.key} must be a positive int, got {value!r}")

    def parameters(self, spec: ModelSpec) -> dict[str, str]:
        """The config parameters of the model that carry these limits (none for models that enforce none)."""
        return {
            parameter.key: parameter.as_text(getattr(self, parameter.key))
            for parameter in spec.parameters
            if parameter in contract.INPUT_LIMIT_PARAMETERS
        }


def _input_config(tensor: TensorSpec) -> pb.ModelInput:
    return pb.ModelInput(
        name=tensor.name,
        data_type=pb.DataType.Value(tensor.dtype.triton_config),
        dims=tensor.dims,
        optional=tensor.optional,
    )


def _output_config(tensor: TensorSpec) -> pb.ModelOutput:
    return pb.ModelOutput(name=tensor.name, data_type=pb.DataType.Value(tensor.dtype.triton_config), dims=tensor.dims)


def _base_config(spec: ModelSpec) -> pb.ModelConfig:
    return pb.ModelConfig(
        name=spec.name,
        max_batch_size=spec.max_batch_size,
        input=[_input_config(t) for t in spec.inputs],
        output=[_output_config(t) for t in spec.outputs],
    )


def _set_parameters(config: pb.ModelConfig, parameters: Mapping[str, str]) -> None:
    for key, value in parameters.items():
        config.parameters[key].string_value = value


def _add_batching(config: pb.ModelConfig, settings: ServingSettings) -> None:
    config.dynamic_batching.max_queue_delay_microseconds = settings.max_queue_delay_us
    config.dynamic_batching.preferred_batch_size.extend(
        size for size in settings.preferred_batch_sizes if size <= config.max_batch_size
    )


def python_model_config(
    spec: ModelSpec,
    settings: ServingSettings,
    *,
    kind: pb.ModelInstanceGroup.Kind.ValueType = pb.ModelInstanceGroup.KIND_CPU,
    parameters: Mapping[str, str] | None = None,
) -> pb.ModelConfig:
    """A Python-backend model: preprocessing, tokenizing, retrieval, or ONNX run in-stub."""
    config = _base_config(spec)
    config.backend = "python"
    _add_batching(config, settings)
    config.instance_group.add(kind=kind, count=settings.instance_count(spec.name))
    _set_parameters(config, parameters or {})
    return config


def onnxruntime_model_config(
    spec: ModelSpec, settings: ServingSettings, *, tensorrt_fp16: bool = True
) -> pb.ModelConfig:
    """An ONNX model on Triton's native onnxruntime backend, on the GPU."""
    config = _base_config(spec)
    config.backend = "onnxruntime"
    config.default_model_filename = "model.onnx"
    _add_batching(config, settings)
    config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_GPU, count=settings.instance_count(spec.name))
    if tensorrt_fp16:
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        accelerator.parameters["precision_mode"] = "FP16"
        accelerator.parameters["max_workspace_size_bytes"] = str(2 << 30)
        accelerator.parameters["trt_engine_cache_enable"] = "1"
        accelerator.parameters["trt_engine_cache_path"] = "/tmp/postsim-trt-cache"
    return config


def ensemble_config(spec: ModelSpec, step_specs: Iterable[ModelSpec]) -> pb.ModelConfig:
    """An ensemble whose steps exchange tensors under their contract names.

    Steps are wired by data alone: Triton 2.51 crashes when it re-creates an ensemble (as it
    does when an index version of `retrieval` is loaded) whose steps map optional inputs.
    A step output that neither a later step nor the ensemble's outputs use is left unmapped
    (Triton refuses unused ensemble tensors; the step is then not asked for it).

    The steps are written last first. Triton schedules them by data, not by their order, but
    when it prunes the steps behind outputs a request does not ask for, it charges an ensemble
    input that no kept step reads (``similar_posts``' ``TOP_K`` once ``retrieval_gateway`` is
    pruned) to the config's first step as if that step had produced it: with
    ``preprocess_image`` first, a request for ``FRAMES`` alone pruned the step that makes it
    and deadlocked. The last step is the one that reads such an input (or none does), and it
    has been pruned by then, so the stray charge is harmless there.
    """
    steps = list(step_specs)
    optional = [tensor.name for tensor in spec.inputs if tensor.optional]
    if optional:
        raise RepositoryError(
            f"ensemble '{spec.name}': optional inputs {optional} (Triton 2.51 crashes re-creating such an ensemble); "
            "serve them through a Python-backend model instead"
        )
    config = _base_config(spec)
    config.platform = "ensemble"
    used = {tensor.name for tensor in spec.outputs} | {tensor.name for step in steps for tensor in step.inputs}
    for step in reversed(steps):
        step_config = config.ensemble_scheduling.step.add(model_name=step.name, model_version=-1)
        for tensor in step.inputs:
            step_config.input_map[tensor.name] = tensor.name
        for tensor in step.outputs:
            if tensor.name in used:
                step_config.output_map[tensor.name] = tensor.name
    _check_ensemble_wiring(config)
    return config


def _check_ensemble_wiring(config: pb.ModelConfig) -> None:
    """Every step input is an ensemble input or another step's output, without a cycle; every output
    is produced, and goes to the client only.

    An ensemble output that a step also reads deadlocks every request that leaves it out of
    its requested outputs: Triton's ensemble scheduler then prunes the step that produces it
    as if nothing needed it (see ``contract.QUERY_EMBEDDING``).
    """
    outputs = {tensor.name for tensor in config.output}
    available = {tensor.name for tensor in config.input}
    waiting = list(config.ensemble_scheduling.step)
    for step in waiting:
        shared = set(step.input_map.values()) & outputs
        if shared:
            raise RepositoryError(
                f"ensemble '{config.name}': step '{step.model_name}' reads the ensemble output(s) {sorted(shared)}; "
                "Triton deadlocks a request that does not ask for them: give the step its own copy of the tensor"
            )
    while waiting:
        runnable = [step for step in waiting if set(step.input_map.values()) <= available]
        if not runnable:
            step = waiting[0]
            missing = set(step.input_map.values()) - available
            raise RepositoryError(f"ensemble '{config.name}': step '{step.model_name}' needs {sorted(missing)}")
        for step in runnable:
            available |= set(step.output_map.values())
            waiting.remove(step)
    unproduced = outputs - available
    if unproduced:
        raise RepositoryError(f"ensemble '{config.name}': no step produces {sorted(unproduced)}")


def repository_configs(
    *,
    target: Target,
    dim: int,
    settings: ServingSettings,
    weights_label: str,
    fingerprint: str,
    include_retrieval: bool,
    limits: InputLimits | None = None,
    repository_id: str = "",
    retrieval: contract.RetrievalSettings | None = None,
) -> dict[str, pb.ModelConfig]:
    """The configs of every model of the repository, by model name.

    ``weights_label`` ("random", "pretrained", ...), the weights ``fingerprint`` and the
    ``repository_id`` go into every model's ``postsim_weights``, ``postsim_fingerprint`` and
    ``postsim_repository_id`` parameters, so a client reading a config sees what it talks to
    (and which repository folder), and an index records what it was built with.
    ``include_retrieval`` adds ``retrieval`` and ``similar_posts``, which need an index.
    ``limits`` (default :class:`InputLimits`) go into the parameters of the models that enforce them;
    ``retrieval`` (default: FAISS) into retrieval's.
    """
    input_limits = limits or InputLimits()
    specs = contract.model_specs(dim)
    configs: dict[str, pb.ModelConfig] = {}
    for name, spec in specs.items():
        if spec.loaded_with_index and not include_retrieval:
            continue
        if spec.is_ensemble:
            configs[name] = ensemble_config(spec, [specs[step] for step in spec.steps])
        elif name == contract.RETRIEVAL:
            configs[name] = retrieval_config(dim, settings, target=target, limits=input_limits, retrieval=retrieval)
        elif spec.onnx is not None and target is Target.TRITON:
            configs[name] = onnxruntime_model_config(spec, settings)
        elif spec.onnx is not None:
            onnx_file = contract.ONNX_FILE_PARAMETER
            session = {onnx_file.key: onnx_file.default, **settings.session_parameters(name)}
            configs[name] = python_model_config(spec, settings, parameters=session)
        else:
            configs[name] = python_model_config(spec, settings, parameters=input_limits.parameters(spec))
    provenance = zip(contract.PROVENANCE_PARAMETERS, (weights_label, fingerprint, repository_id), strict=True)
    written = {parameter.key: parameter.as_text(value) for parameter, value in provenance}
    for config in configs.values():
        _set_parameters(config, written)
    return configs


def retrieval_config(
    dim: int,
    settings: ServingSettings,
    *,
    target: Target,
    limits: InputLimits | None = None,
    retrieval: contract.RetrievalSettings | None = None,
) -> pb.ModelConfig:
    """The retrieval model: serves the newest index version only, from one instance (it holds the live index)."""
    if settings.instance_count(contract.RETRIEVAL) != 1:
        raise RepositoryError(
            f"retrieval runs as one instance (it holds the live index and appends to its journal), got "
            f"{settings.instance_count(contract.RETRIEVAL)}: leave it out of ServingSettings.instances"
        )
    kind = pb.ModelInstanceGroup.KIND_GPU if target is Target.TRITON else pb.ModelInstanceGroup.KIND_CPU
    spec = contract.model_specs(dim)[contract.RETRIEVAL]
    parameters = {
        **(limits or InputLimits()).parameters(spec),
        **(retrieval or contract.RetrievalSettings()).parameters(),
    }
    config = python_model_config(spec, settings, kind=kind, parameters=parameters)
    config.version_policy.latest.num_versions = 1
    return config


def apply_serving_settings(repository: Path, serving: ServingSettings) -> None:
    """Rewrite the scheduling of every non-ensemble model's config (batching, instances, threads).

    Everything else in each config (tensors, parameters such as the ONNX file) stays as exported.
    """
    for config_path in sorted(repository.glob(f"*/{CONFIG_NAME}")):
        config = parse_pbtxt(config_path.read_text())
        if config.platform == "ensemble":
            continue
        name = config.name
        if config.HasField("dynamic_batching"):
            batching = config.dynamic_batching
            batching.max_queue_delay_microseconds = serving.max_queue_delay_us
            del batching.preferred_batch_size[:]
            batching.preferred_batch_size.extend(
                size for size in serving.preferred_batch_sizes if size <= config.max_batch_size
            )
        for group in config.instance_group:
            group.count = serving.instance_count(name)
        if contract.INTRA_OP_THREADS_PARAMETER.key in config.parameters:
            for key, value in serving.session_parameters(name).items():
                config.parameters[key].string_value = value
        write_text_atomic(config_path, to_pbtxt(config))  # a new file: never through the hard link to the original


def apply_retrieval(repository: Path, retrieval: contract.RetrievalSettings) -> None:
    """Point the ``retrieval`` config of an exported repository at another engine (as ``postsim export --retrieval``).

    Published versions are left as they are: publish an index again for the new engine. A
    running server uses the new engine when retrieval is loaded again.
    """
    if retrieval.backend is contract.RetrievalBackend.MILVUS:
        require_pymilvus()
    config_path = repository / contract.RETRIEVAL / CONFIG_NAME
    if not config_path.is_file():
        raise RepositoryError(
            f"{repository} has no {contract.RETRIEVAL} config: run `postsim export --repository {repository}` first"
        )
    config = parse_pbtxt(config_path.read_text())
    _set_parameters(config, retrieval.parameters())
    write_text_atomic(config_path, to_pbtxt(config))


def apply_input_limits(repository: Path, limits: InputLimits) -> list[str]:
    """Rewrite the limit parameters in the configs of an exported repository; returns the models changed.

    Each config is replaced through a rename (never written in place, so a hard-linked copy
    of a repository keeps its own). A running server applies the new limits when the
    models are loaded again (``load_model``, or a restart).
    """
    changed = []
    for spec in contract.MODELS:
        config_path = repository / spec.name / CONFIG_NAME
        if not limits.parameters(spec) or not config_path.is_file():
            continue
        config = parse_pbtxt(config_path.read_text())
        _set_parameters(config, limits.parameters(spec))
        write_text_atomic(config_path, to_pbtxt(config))
        changed.append(spec.name)
    if contract.PREPROCESS_IMAGE not in changed:
        raise RepositoryError(
            f"{repository} has no {contract.PREPROCESS_IMAGE} config: run `postsim export --repository {repository}` first"
        )
    return changed
