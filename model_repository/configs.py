"""Reading and writing a model's ``config.pbtxt`` as tritonclient's ``ModelConfig``.

The generator (``postsim.export.triton_config``) writes configs with :func:`to_pbtxt`;
whatever reads one back (the launcher counting Python-backend processes, the in-process
pipeline finding a model's ONNX file, the benchmark rewriting a copy's scheduling) parses it
with :func:`parse_pbtxt` and reads its parameters through
:meth:`~postsim.model_repository.contract.ConfigParameter.read`.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from postsim.core.errors import RepositoryError
from postsim.model_repository import contract
from postsim.model_repository.layout import CONFIG_NAME


def to_pbtxt(config: pb.ModelConfig) -> str:
    return text_format.MessageToString(config)


def parse_pbtxt(text: str) -> pb.ModelConfig:
    """Parse a ``config.pbtxt``; a malformed one raises RepositoryError naming the problem."""
    try:
        return text_format.Parse(text, pb.ModelConfig())
    except text_format.ParseError as error:
        raise RepositoryError(f"config.pbtxt does not parse as a Triton ModelConfig: {error}") from None


def read_config(repository: Path, model: str) -> pb.ModelConfig:
    """The config of ``model`` in ``repository``; RepositoryError when it is missing or does not parse."""
    path = repository / model / CONFIG_NAME
    try:
        text = path.read_text()
    except OSError as error:
        raise RepositoryError(
            f"cannot read {path} ({error.strerror}): run `postsim export --repository {repository}` first"
        ) from None
    return parse_pbtxt(text)


def retrieval_settings(repository: Path) -> contract.RetrievalSettings:
    """The engine the repository's ``retrieval`` searches, as its export wrote it (faiss for older exports)."""
    config = read_config(repository, contract.RETRIEVAL)
    return contract.RetrievalSettings.from_parameters(contract.config_parameters(config))
