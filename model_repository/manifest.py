"""Which weights a model repository holds: ``weights.json`` at the repository's root.

``postsim export`` writes it after the models; it records where each model's weights came
from (pretrained, random, a directory, a head checkpoint), the sha256 of every generated
weight file, one fingerprint over them, and the repository's id. ``postsim serve`` logs it at
start (a warning when the weights are random), the retrieval model refuses an index built
against another fingerprint, and an index manifest records the fingerprint it was built with.

Every model config carries the weights label, the fingerprint and the repository id as
parameters (``contract.PROVENANCE_PARAMETERS``), so a client can tell which export a server
serves: ``postsim index publish`` checks that the server serves the repository it writes to.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from postsim.core.errors import RepositoryError
from postsim.core.files import write_text_atomic
from postsim.model_repository.layout import Target

logger = logging.getLogger("postsim")
MANIFEST_NAME = "weights.json"
HEAD_PROVENANCE = "head"
"""The provenance entry of the head (``postsim.models.weights`` writes it)."""
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint_of(file_hashes: dict[str, str]) -> str:
    """One hash over the weight files' hashes, independent of the order they were listed."""
    digest = hashlib.sha256()
    for relative_path in sorted(file_hashes):
        digest.update(f"{relative_path}={file_hashes[relative_path]}\n".encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True, kw_only=True)
class WeightsManifest:
    target: str
    dim: int
    precision: str
    random_weights: bool
    provenance: dict[str, Any]
    """Where each model's weights came from, as the exporter describes it."""
    files: dict[str, str] = field(default_factory=dict)
    """sha256 of each weight file, by path relative to the repository."""
    fingerprint: str = ""
    repository_id: str = ""
    """Names the repository folder across exports into it (empty in repositories exported before it existed)."""
    created: str = ""
    postsim_version: str = ""

    @property
    def head(self) -> dict[str, Any]:
        """Where the projections and the fuser came from: ``{"seeded": seed}`` or a trained checkpoint's record."""
        head = self.provenance.get(HEAD_PROVENANCE)
        if isinstance(head, dict):
            return head
        fuser = self.provenance.get("fuser", {})  # manifests written before the head entry existed
        weights = str(fuser.get("weights", "")) if isinstance(fuser, dict) else ""
        return (
            {"checkpoint": weights.removeprefix("checkpoint:")} if weights.startswith("checkpoint:") else {"seeded": 0}
        )

    @property
    def head_is_seeded(self) -> bool:
        """True when the projections and the fuser are a seeded initialisation, not trained."""
        return "checkpoint" not in self.head

    @property
    def weights_label(self) -> str:
        return "random" if self.random_weights else "pretrained"

    def describe(self) -> str:
        """One line for logs: what the server is about to serve."""
        sources = ", ".join(
            f"{model}: {info.get('backbone') or info.get('weights')}"
            for model, info in self.provenance.items()
            if isinstance(info, dict) and model != HEAD_PROVENANCE
        )
        head = self.head
        trained = f"head {head.get('sha256', '')[:12] or head.get('checkpoint')}"
        sources += f"; {'seeded head' if self.head_is_seeded else trained}"
        return (
            f"weights fingerprint {self.fingerprint} ({self.target} target, {self.precision}, dim {self.dim}; "
            f"{sources})"
        )

    def write(self, repository: Path) -> Path:
        path = repository / MANIFEST_NAME
        write_text_atomic(path, json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def read(cls, repository: Path) -> WeightsManifest:
        path = repository / MANIFEST_NAME
        if not path.is_file():
            raise RepositoryError(
                f"{repository} holds no exported models ({MANIFEST_NAME} is missing): "
                f"run `postsim export --repository {repository}` first"
            )
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as error:
            raise RepositoryError(
                f"{path} is not a postsim weights manifest ({error}): export the repository again"
            ) from None

    def require_embedded_target(self, repository: Path) -> None:
        """``postsim serve`` runs the embedded target only: say where another target's export runs."""
        if self.target == Target.EMBEDDED.value:
            return
        raise RepositoryError(
            f"{repository} was exported with `--target {self.target}`, for Triton's onnxruntime backend with "
            "TensorRT on a GPU, which the tritonserver behind `postsim serve` (the nvidia-pytriton wheel) does not "
            "have: serve it with NGC's Triton container (docker/Dockerfile; see docker/README.md), or export again "
            f"with `--target {Target.EMBEDDED.value}` to serve it here"
        )

    def verify_files(self, repository: Path) -> None:
        """Check every recorded weight file is there and unchanged."""
        for relative_path, expected in self.files.items():
            path = repository / relative_path
            if not path.is_file():
                raise RepositoryError(f"{path} is missing: export the repository again")
            if sha256_file(path) != expected:
                raise RepositoryError(
                    f"{path} does not match its sha256 in {MANIFEST_NAME}: the file changed after export; "
                    "export the repository again"
                )


def repository_id_of(repository: Path) -> str:
    """The id a new export of ``repository`` gets: the one it has, so a re-export keeps naming the folder."""
    try:
        previous = str(json.loads((repository / MANIFEST_NAME).read_text()).get("repository_id", ""))
    except (OSError, ValueError, AttributeError):
        previous = ""
    return previous or uuid.uuid4().hex[:16]


def log_weights(manifest: WeightsManifest) -> None:
    """Say loudly when the server is about to serve random backbones or an untrained head."""
    if manifest.random_weights:
        logger.warning(
            "SERVING RANDOM WEIGHTS: embeddings carry no meaning (%s). Export with `--weights pretrained` "
            "for real results.",
            manifest.describe(),
        )
    else:
        logger.info("serving %s", manifest.describe())
    if manifest.head_is_seeded:
        logger.warning(
            "SERVING AN UNTRAINED HEAD: the projections and the fuser are a seeded initialisation, so the modality "
            "weights are arbitrary and the fused space keeps only what random projections keep. Train one on "
            "labelled posts with `postsim train CORPUS --out DIR` (the backbone options of this export) and export "
            "with `--head DIR/head.pt`."
        )
