"""The generated config.pbtxt of both targets, parsed back into tritonclient's ModelConfig."""

from __future__ import annotations

import dataclasses

import pytest
from tritonclient.grpc import model_config_pb2 as pb

from postsim.core.errors import RepositoryError
from postsim.export.triton_config import (
    ServingSettings,
    Target,
    ensemble_config,
    repository_configs,
    retrieval_config,
)
from postsim.model_repository import contract
from postsim.model_repository.configs import parse_pbtxt, to_pbtxt

DIM = 128


def _configs(target: Target) -> dict[str, pb.ModelConfig]:
    configs = repository_configs(
        target=target,
        dim=DIM,
        settings=ServingSettings(),
        weights_label="random",
        fingerprint="0123abcd",
        include_retrieval=True,
    )
    return {name: parse_pbtxt(to_pbtxt(config)) for name, config in configs.items()}


@pytest.mark.parametrize("target", list(Target))
def test_every_model_config_parses_with_the_contract_tensors(target: Target) -> None:
    configs = _configs(target)
    specs = contract.model_specs(DIM)
    assert set(configs) == set(specs)
    for name, config in configs.items():
        spec = specs[name]
        assert config.name == name
        assert [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in config.input] == [
            (t.name, t.dtype.triton_config, list(t.dims)) for t in spec.inputs
        ]
        assert [t.optional for t in config.input] == [t.optional for t in spec.inputs]
        if spec.is_ensemble:
            assert not any(t.optional for t in config.input), "Triton 2.51 crashes re-creating ensembles with them"
        assert [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in config.output] == [
            (t.name, t.dtype.triton_config, list(t.dims)) for t in spec.outputs
        ]
        assert config.parameters["postsim_weights"].string_value == "random"
        assert config.parameters["postsim_fingerprint"].string_value == "0123abcd"


@pytest.mark.parametrize("target", list(Target))
def test_public_contract_of_post_embedding(target: Target) -> None:
    config = _configs(target)[contract.POST_EMBEDDING]
    assert config.platform == "ensemble"
    assert config.max_batch_size >= 8
    inputs = {t.name: (pb.DataType.Name(t.data_type), list(t.dims)) for t in config.input}
    assert inputs == {"IMAGE": ("TYPE_STRING", [1]), "TEXT": ("TYPE_STRING", [1])}
    outputs = {t.name: (pb.DataType.Name(t.data_type), list(t.dims)) for t in config.output}
    assert outputs == {
        "EMBEDDING": ("TYPE_FP32", [DIM]),
        "MODALITY_WEIGHTS": ("TYPE_FP32", [2]),
        "IMAGE_EMBEDDING": ("TYPE_FP32", [DIM]),
        "TEXT_EMBEDDING": ("TYPE_FP32", [DIM]),
        "FRAMES": ("TYPE_INT32", [1]),
    }
    # Written last first (see ensemble_config): Triton charges pruned ensemble inputs to the first step.
    assert [step.model_name for step in config.ensemble_scheduling.step] == [
        "fuser",
        "text_encoder",
        "image_encoder",
        "tokenize",
        "preprocess_image",
    ]


@pytest.mark.parametrize("target", list(Target))
def test_public_contract_of_similar_posts(target: Target) -> None:
    config = _configs(target)[contract.SIMILAR_POSTS]
    inputs = {t.name: (pb.DataType.Name(t.data_type), list(t.dims)) for t in config.input}
    assert inputs["TOP_K"] == ("TYPE_INT32", [1])
    outputs = {t.name: (pb.DataType.Name(t.data_type), list(t.dims)) for t in config.output}
    assert outputs["IDS"] == ("TYPE_STRING", [-1])
    assert outputs["SCORES"] == ("TYPE_FP32", [-1])
    assert outputs["CONTRIBUTIONS"] == ("TYPE_FP32", [-1, 4])
    assert outputs["IMAGE_EMBEDDING"] == outputs["TEXT_EMBEDDING"] == ("TYPE_FP32", [DIM])
    # retrieval is reached through the gateway, so loading an index version re-creates no ensemble.
    assert config.ensemble_scheduling.step[0].model_name == "retrieval_gateway"
    assert outputs["FRAMES"] == ("TYPE_INT32", [1])


def test_tokenize_waits_for_the_post_checks_of_preprocess_image() -> None:
    config = _configs(Target.EMBEDDED)[contract.POST_EMBEDDING]
    (tokenize,) = [step for step in config.ensemble_scheduling.step if step.model_name == "tokenize"]
    assert dict(tokenize.input_map) == {"CHECKED_TEXT": "CHECKED_TEXT"}


@pytest.mark.parametrize("target", list(Target))
def test_every_batching_model_batches_dynamically(target: Target) -> None:
    for name, config in _configs(target).items():
        if config.platform == "ensemble":
            continue
        assert config.HasField("dynamic_batching"), name
        assert all(size <= config.max_batch_size for size in config.dynamic_batching.preferred_batch_size)
        assert len(config.instance_group) == 1 and config.instance_group[0].count >= 1


def test_embedded_target_runs_every_model_in_the_python_backend() -> None:
    for name, config in _configs(Target.EMBEDDED).items():
        if config.platform == "ensemble":
            continue
        assert config.backend == "python", name
        assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    assert _configs(Target.EMBEDDED)[contract.IMAGE_ENCODER].parameters["onnx_file"].string_value == "model.onnx"


def test_triton_target_runs_onnx_models_natively_on_gpu_with_tensorrt_fp16() -> None:
    configs = _configs(Target.TRITON)
    for name in contract.ONNX_MODELS:
        config = configs[name]
        assert config.backend == "onnxruntime"
        assert config.default_model_filename == "model.onnx"
        assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
        (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
        assert accelerator.name == "tensorrt"
        assert accelerator.parameters["precision_mode"] == "FP16"
    assert configs[contract.PREPROCESS_IMAGE].backend == "python"
    assert configs[contract.RETRIEVAL].version_policy.latest.num_versions == 1


def test_both_targets_share_model_and_tensor_names() -> None:
    def names(configs: dict[str, pb.ModelConfig]) -> dict[str, tuple[list[str], list[str]]]:
        return {n: ([t.name for t in c.input], [t.name for t in c.output]) for n, c in configs.items()}

    assert names(_configs(Target.EMBEDDED)) == names(_configs(Target.TRITON))


def test_ensemble_wiring_is_checked() -> None:
    specs = contract.model_specs(DIM)
    # Without the fuser, nothing produces EMBEDDING.
    steps = [specs[name] for name in ("preprocess_image", "tokenize", "image_encoder", "text_encoder")]
    with pytest.raises(RepositoryError, match="no step produces"):
        ensemble_config(specs[contract.POST_EMBEDDING], steps)


@pytest.mark.parametrize("target", list(Target))
def test_ensemble_outputs_go_to_the_client_only_and_every_mapped_tensor_is_used(target: Target) -> None:
    """What keeps every subset of requested outputs working (Triton prunes unrequested outputs' steps)."""
    for name in (contract.POST_EMBEDDING, contract.SIMILAR_POSTS):
        config = _configs(target)[name]
        outputs = {tensor.name for tensor in config.output}
        read = {tensor for step in config.ensemble_scheduling.step for tensor in step.input_map.values()}
        written = {tensor for step in config.ensemble_scheduling.step for tensor in step.output_map.values()}
        assert not read & outputs, name
        assert written == (read | outputs) - {tensor.name for tensor in config.input}, name
    (gateway,) = [
        step
        for step in _configs(target)[contract.SIMILAR_POSTS].ensemble_scheduling.step
        if step.model_name == contract.RETRIEVAL_GATEWAY
    ]
    assert set(gateway.input_map) == {
        "QUERY_EMBEDDING",
        "TOP_K",
        "QUERY_IMAGE_EMBEDDING",
        "QUERY_TEXT_EMBEDDING",
        "QUERY_MODALITY_WEIGHTS",
    }


def test_a_step_reading_an_ensemble_output_is_refused() -> None:
    specs = contract.model_specs(DIM)
    gateway = dataclasses.replace(
        specs[contract.RETRIEVAL_GATEWAY], inputs=(contract.EMBEDDING.at_dim(DIM), contract.TOP_K)
    )
    steps = [specs[name] for name in ("preprocess_image", "tokenize", "image_encoder", "text_encoder", "fuser")]
    with pytest.raises(RepositoryError, match=r"retrieval_gateway' reads the ensemble output\(s\) \['EMBEDDING'\]"):
        ensemble_config(specs[contract.SIMILAR_POSTS], [*steps, gateway])


def test_malformed_pbtxt_is_a_repository_error() -> None:
    with pytest.raises(RepositoryError, match="does not parse"):
        parse_pbtxt('name: "x"\nmax_batch_size: "many"\n')


def test_retrieval_is_refused_more_than_one_instance() -> None:
    settings = ServingSettings(instances={contract.RETRIEVAL: 2})
    with pytest.raises(RepositoryError, match="retrieval runs as one instance"):
        retrieval_config(DIM, settings, target=Target.EMBEDDED)


def test_the_retrieval_backend_is_written_into_retrieval_and_read_back() -> None:
    """FAISS by default; the milvus choice and URI travel in retrieval's parameters (and no other model's)."""
    default = contract.config_parameters(_configs(Target.EMBEDDED)[contract.RETRIEVAL])
    assert contract.RetrievalSettings.from_parameters(default) == contract.RetrievalSettings()
    chosen = contract.RetrievalSettings(backend=contract.RetrievalBackend.MILVUS, milvus_uri="http://milvus:19530")
    configs = repository_configs(
        target=Target.EMBEDDED,
        dim=DIM,
        settings=ServingSettings(),
        weights_label="random",
        fingerprint="0123abcd",
        include_retrieval=True,
        retrieval=chosen,
    )
    for name, config in configs.items():
        parameters = contract.config_parameters(parse_pbtxt(to_pbtxt(config)))
        if name == contract.RETRIEVAL:
            assert contract.RetrievalSettings.from_parameters(parameters) == chosen
        else:
            assert contract.MILVUS_URI_PARAMETER.key not in parameters
    assert contract.RetrievalSettings.from_parameters({}) == contract.RetrievalSettings()  # older exports: faiss
    with pytest.raises(RepositoryError, match="none of faiss, milvus"):
        contract.RetrievalSettings.from_parameters({contract.RETRIEVAL_BACKEND_PARAMETER.key: "annoy"})
