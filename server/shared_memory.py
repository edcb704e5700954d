"""Shared memory (``/dev/shm``) that Triton's Python-backend processes start with, and whether there is enough."""

from __future__ import annotations

import os
from pathlib import Path

from postsim.core.errors import RepositoryError
from postsim.model_repository.configs import read_config
from postsim.model_repository.protocol import SHARED_MEMORY_HINT

MIN_SHM_DEFAULT_BYTES = 4 << 20
"""Triton's Python backend refuses a smaller ``shm-default-byte-size``."""
SHM_DIR = Path("/dev/shm")


def python_instance_count(repository: Path, models: list[str]) -> int:
    """How many Python-backend processes (stubs) serving ``models`` starts: one per model instance."""
    count = 0
    for model in models:
        try:
            config = read_config(repository, model)
        except RepositoryError:
            continue  # Triton reports a broken config itself, by name
        if config.backend == "python":
            count += sum(max(group.count, 1) for group in config.instance_group) or 1
    return count


def shared_memory_warning(*, instances: int, shm_default_bytes: int, free_bytes: int) -> str | None:
    """Why ``free_bytes`` of /dev/shm may be too little for ``instances`` stubs, or None."""
    needed = instances * shm_default_bytes
    if free_bytes >= needed:
        return None
    mib = 1 << 20
    return (
        f"/dev/shm has {free_bytes / mib:.0f} MiB free, less than the {needed / mib:.0f} MiB the "
        f"{instances} Python-backend model processes start with ({shm_default_bytes / mib:.0f} MiB each, "
        f"ServerSettings.shm_default_bytes), before any batch: requests will fail with shared-memory errors. "
        f"{SHARED_MEMORY_HINT}"
    )


def free_shared_memory_bytes(shm_dir: Path = SHM_DIR) -> int | None:
    try:
        stats = os.statvfs(shm_dir)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize
