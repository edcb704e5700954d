"""Triton Python-backend entry point of `preprocess_image`; the code is in postsim.model_repository."""

from postsim.model_repository.backend_models import PreprocessImageModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
