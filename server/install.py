"""A runnable tritonserver: the binary of the nvidia-pytriton wheel, laid out once in the cache.

The wheel ships Triton 2.51 with its Python backend, but not laid out to run as is: the
Python-backend stub for this interpreter's version must sit in ``backends/python/`` and the
wheel's bundled libraries must be on the library path. :func:`prepare_triton` builds that
layout once, under postsim's cache folder (:func:`~postsim.core.paths.cache_root`).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from postsim.core.errors import ServeError
from postsim.core.paths import cache_root

logger = logging.getLogger("postsim")


def _pytriton_dist() -> tuple[Path, Path, str]:
    """The wheel's tritonserver folder, its bundled libraries and the wheel's version."""
    try:
        from importlib.metadata import version

        import pytriton
    except ImportError:
        raise ServeError(
            "`postsim serve` runs the tritonserver binary of the nvidia-pytriton wheel: "
            "install it with `pip install nvidia-pytriton`, or run Triton's NGC container (see docker/README.md)"
        ) from None
    package_dir = Path(pytriton.__file__).resolve().parent
    return package_dir / "tritonserver", package_dir.parent / "nvidia_pytriton.libs", version("nvidia-pytriton")


def prepare_triton(cache_dir: Path | None = None) -> tuple[Path, Path]:
    """A runnable copy of the wheel's tritonserver (with this Python's stub) and the library folder."""
    source, libraries, wheel_version = _pytriton_dist()
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = source / "python_backend_stubs" / python_version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServeError(f"nvidia-pytriton {wheel_version} ships no Python-backend stub for Python {python_version}")
    cache_root_dir = cache_dir or cache_root()
    target = cache_root_dir / f"tritonserver-{wheel_version}-py{python_version}"
    if (target / "backends" / "python" / "triton_python_backend_stub").is_file():
        return target, libraries
    cache_root_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tritonserver-", dir=cache_root_dir))
    shutil.copytree(source, staging / "t", ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
    shutil.copy2(stub, staging / "t" / "backends" / "python" / "triton_python_backend_stub")
    with contextlib.suppress(FileExistsError, OSError):
        (staging / "t").rename(target)  # another process may have won the race: theirs is as good
    shutil.rmtree(staging, ignore_errors=True)
    logger.info("prepared tritonserver %s in %s", wheel_version, target)
    return target, libraries
