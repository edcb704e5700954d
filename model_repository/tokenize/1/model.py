"""Triton Python-backend entry point of `tokenize`; the code is in postsim.model_repository."""

from postsim.model_repository.backend_models import TokenizeModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
