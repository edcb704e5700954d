"""The one exception family of postsim.

Every error postsim raises on purpose is a :class:`PostSimError`; its message says what
went wrong and what the user can do about it. The subclasses say where it happened, so a
caller can catch the kind it can handle and let the rest surface. The CLI reports any of
them as one line and exit code 1 (2 for a :class:`SettingsError`).
"""

from __future__ import annotations


class PostSimError(Exception):
    """Base of every error postsim raises on purpose."""


class InvalidPostError(PostSimError, ValueError):
    """A post (or a request built from it) is not valid: caught before or by the server."""


class SettingsError(PostSimError, ValueError):
    """Settings that cannot all be honoured, such as an option that the chosen mode would ignore.

    The message names the option, says why it does not apply, and what to pass instead.
    The CLI reports it as a usage error (exit code 2).
    """


class ExportError(PostSimError):
    """Exporting the models or writing the model repository failed."""


class ExportMismatchError(ExportError):
    """An exported ONNX model does not reproduce its PyTorch module within tolerance."""


class RepositoryError(PostSimError):
    """The model repository is missing, incomplete or inconsistent."""


class ServeError(PostSimError):
    """Starting or running tritonserver failed."""


class SearchIndexError(PostSimError):
    """Building, verifying, publishing or loading a FAISS index failed."""


class TrainingError(PostSimError, ValueError):
    """Training the head or extracting its features cannot go on as asked."""


class EvaluationError(PostSimError, ValueError):
    """Retrieval quality cannot be measured as asked (views or slices that do not fit together)."""


class BenchError(PostSimError):
    """A benchmark cannot run as asked (bad settings, a configuration that failed)."""


NO_INDEX_MESSAGE = "no index is published yet: publish one with `postsim index publish`"
INDEX_NOT_LOADED_MESSAGE = "the published index is not loaded"
INDEX_SEALED_MESSAGE = "the index is being compacted into a new version"


class NoIndexPublishedError(SearchIndexError):
    """similar_posts was asked before any index was published: ``retrieval`` has no version on disk."""

    def __init__(self) -> None:
        super().__init__(NO_INDEX_MESSAGE)


class IndexSealedError(SearchIndexError):
    """A change reached an index version being compacted into the next one: retry it once that one serves."""

    def __init__(self) -> None:
        super().__init__(f"{INDEX_SEALED_MESSAGE} and takes no changes for a moment: retry in a few seconds")


class JournalWrittenElsewhereError(SearchIndexError):
    """A change reached a replica whose index version's change journal another server writes.

    Replicas on one shared repository (a Kubernetes volume) read the same journal file; one of
    them, the first to open it, writes it. The others serve the changes made before they
    started and refuse new ones, which would otherwise interleave two writers in one file.
    """

    def __init__(self, path: object) -> None:
        super().__init__(
            f"another server writes the changes of this index version ({path}): replicas that share a "
            "repository take upserts and deletes through one of them, the first that served it; send them there, or "
            "export with --retrieval milvus so that every replica takes changes"
        )


class IndexNotLoadedError(SearchIndexError):
    """similar_posts was asked while ``retrieval`` has a version on disk but is not loaded or not ready."""

    def __init__(self, version: int) -> None:
        super().__init__(
            f"{INDEX_NOT_LOADED_MESSAGE}: retrieval version {version} is on disk, but the server does not serve "
            "retrieval (an admin unloaded it, or it failed to load: the server log says which); "
            "load model 'retrieval' again (model control, with the admin key) or restart `postsim serve`"
        )


class ServerError(PostSimError):
    """The server answered a request with an error.

    ``status`` is the gRPC status code name (``INVALID_ARGUMENT``, ``UNAVAILABLE`` ...) so
    callers can tell a bad request from an unavailable server.
    """

    def __init__(self, message: str, *, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status


class ServerUnavailableError(ServerError):
    """The server cannot be reached or is not ready."""


class OptionalDependencyError(PostSimError, ImportError):
    """A feature needs a package from an extra that is not installed."""

    def __init__(self, package: str, extra: str, feature: str) -> None:
        super().__init__(
            f"{feature} needs the '{package}' package: install it with "
            f"`pip install 'postsim[{extra}]'`"
            + (" (install torch first with `pip install torch==2.13.0` for the CPU build)" if extra == "export" else "")
        )
        self.package = package
        self.extra = extra
