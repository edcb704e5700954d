"""Triton Python-backend entry point of `image_encoder`; the code is in postsim.model_repository."""

from postsim.model_repository.backend_models import OnnxRuntimeModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
