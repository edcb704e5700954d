"""Where postsim writes what it generates, and what it caches, unless told otherwise: never the source tree.

Exported model repositories, index versions, sample corpora, index builds, benchmark
results and the demo's work all default to places under :func:`postsim_home`, one per-user
data folder, never to the source tree or the current folder: a clone stays as it was
checked out, whatever command ran in it, and the package folder is only code.

``POSTSIM_HOME`` names the folder; without it, the XDG data folder (``$XDG_DATA_HOME/postsim``,
``~/.local/share/postsim`` when that is unset). ``POSTSIM_REPOSITORY`` names the model
repository itself (the container images set it to ``/models``).

What can be made again lives in :func:`cache_root` instead: the runnable copy of the
wheel's tritonserver, training's feature cache.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "POSTSIM_HOME"
REPOSITORY_ENV = "POSTSIM_REPOSITORY"
REPOSITORY_SUBDIR = "model_repository"
RUNS_SUBDIR = "runs"
"""Outputs of commands that produce files: ``runs/<what>`` (demo, sample-posts, index, bench)."""


def postsim_home() -> Path:
    """``$POSTSIM_HOME``, else ``$XDG_DATA_HOME/postsim``, else ``~/.local/share/postsim`` (not created here)."""
    explicit = os.environ.get(HOME_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg_data = os.environ.get("XDG_DATA_HOME", "")
    # The XDG spec: a relative XDG_DATA_HOME is invalid and is ignored.
    base = Path(xdg_data) if Path(xdg_data).is_absolute() else Path.home() / ".local" / "share"
    return base / "postsim"


def default_repository() -> Path:
    """The model repository every command uses when given none: ``$POSTSIM_REPOSITORY``, else under the home."""
    explicit = os.environ.get(REPOSITORY_ENV)
    return Path(explicit).expanduser() if explicit else postsim_home() / REPOSITORY_SUBDIR


def default_run_dir(name: str) -> Path:
    """The default output folder of a command's run, ``<home>/runs/<name>``."""
    return postsim_home() / RUNS_SUBDIR / name


CACHE_ENV = "POSTSIM_CACHE_DIR"
"""Overrides the cache root (default: ``$XDG_CACHE_HOME/postsim``, else ``~/.cache/postsim``)."""


def cache_root() -> Path:
    """postsim's per-user cache folder: ``$POSTSIM_CACHE_DIR``, else the XDG cache's ``postsim`` (not created here).

    Never inside the source tree: caches are generated and large.
    """
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "postsim"
