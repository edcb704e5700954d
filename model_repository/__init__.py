"""postsim's Triton model repository code: what runs in a repository, and what writes and reads one.

``postsim export`` generates a Triton model repository (one folder per model,
``config.pbtxt`` and version folders) wherever it is told, by default under the per-user
data folder (:mod:`postsim.core.paths`), never in this package. This
package holds the tensor contract every part of postsim reads, the server-side
preprocessing and retrieval that the repository's Python-backend models import (each
``model.py`` is one import from :mod:`postsim.model_repository.backend_models`), and the
launcher behind ``postsim serve``.
"""
