"""What every ``postsim`` command shares: the consoles, the common options, and errors as one line.

Every command reports a :class:`PostSimError` as one readable line on stderr and exits 1;
bad arguments exit 2 (typer's usage errors). Library code logs through the ``postsim``
logger; the command modules decide what is shown.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from postsim.core.errors import PostSimError, SettingsError
from postsim.core.paths import default_repository, default_run_dir

stderr = Console(stderr=True)


stdout = Console()


F = TypeVar("F", bound=Callable[..., Any])


RepositoryOption = Annotated[
    Path,
    typer.Option(
        "--repository",
        default_factory=default_repository,
        show_default="$POSTSIM_REPOSITORY, else $POSTSIM_HOME/model_repository",
        help="Triton model repository folder. POSTSIM_HOME defaults to ~/.local/share/postsim.",
    ),
]


UrlOption = Annotated[str, typer.Option("--url", help="gRPC endpoint of a running postsim server (HOST:PORT).")]


ShrinkImagesOption = Annotated[
    bool,
    typer.Option(
        "--shrink-images",
        help="Send each image larger than the encoder needs resized to its scale, as a JPEG: far fewer bytes, "
        "an embedding that moves slightly (README: Client-side shrinking).",
    ),
]


def run_dir_option(name: str, description: str) -> Any:
    """An output-folder option that defaults to ``$POSTSIM_HOME/runs/<name>``, outside the source tree."""
    return typer.Option(
        default_factory=lambda: default_run_dir(name), show_default=f"$POSTSIM_HOME/runs/{name}", help=description
    )


def reports_errors(command: F) -> F:
    """Turn a PostSimError into one line on stderr and exit code 1 (2 for settings that contradict), no traceback."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except PostSimError as error:
            stderr.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2 if isinstance(error, SettingsError) else 1) from None

    return wrapper  # type: ignore[return-value]


E = TypeVar("E")


def choice(enum_type: type[E], value: str, option: str) -> E:
    try:
        return enum_type(value)  # type: ignore[call-arg]
    except ValueError:
        choices = ", ".join(member.value for member in enum_type)  # type: ignore[attr-defined]
        raise typer.BadParameter(f"{value!r} is not one of {choices}", param_hint=option) from None
