"""How the client words a failed call: tritonclient's exceptions as postsim's, with what to do.

:func:`map_server_error` turns every :class:`~tritonclient.utils.InferenceServerException`
into :class:`~postsim.core.errors.ServerUnavailableError` (no server, or one that cannot
answer now: retry), :class:`~postsim.core.errors.InvalidPostError` (the request is at fault)
or :class:`~postsim.core.errors.ServerError` (anything else), by its gRPC status and its
words, which the server's own answers (``postsim.model_repository.protocol``) make
recognisable. The caller raises it ``from None``.

Triton checks a request against the model's config before any postsim model sees it, and
two of its messages mislead:

- A request with an input the model does not take, on top of the ones it does, fails
  Triton's count of inputs. Its message then lists the required inputs that are missing;
  with none missing, the code that formats the list drops its opening bracket along with
  the trailing comma, and the message ends "but missing required input(s) ]." without
  naming the input that is too many.
- A request of 0 posts (shape ``[0, 1]``) is counted as one post with no data: "expected 1
  string elements for inference input 'TEXT' ..., got 0", the same message as a post whose
  data is missing.

:func:`explain` rewrites these two with the model's inputs from the contract; any other
message comes back unchanged. :func:`map_server_error` applies it to every
INVALID_ARGUMENT it reports.
"""

from __future__ import annotations

import logging
import re

from tritonclient.utils import InferenceServerException

from postsim.core.errors import (
    INDEX_NOT_LOADED_MESSAGE,
    INDEX_SEALED_MESSAGE,
    NO_INDEX_MESSAGE,
    InvalidPostError,
    PostSimError,
    ServerError,
    ServerUnavailableError,
)
from postsim.model_repository import contract
from postsim.model_repository.protocol import (
    OVERLOADED_MESSAGE,
    RETRY_SOON_MESSAGES,
    SHARED_MEMORY_HINT,
    SHUTTING_DOWN_MESSAGE,
    is_shared_memory_error,
    unhealthy_stubs,
)

logger = logging.getLogger("postsim")

MAX_MESSAGE_CHARS = 500
"""The longest server message quoted in an error."""


def _status_name(exc: InferenceServerException) -> str | None:
    """``StatusCode.UNAVAILABLE`` (as tritonclient's gRPC client sets it) -> ``UNAVAILABLE``."""
    status = exc.status()
    if not status:
        return None
    return str(status).removeprefix("StatusCode.")


def _short(message: str) -> str:
    first = message.strip().splitlines()[0] if message.strip() else ""
    return first if len(first) <= MAX_MESSAGE_CHARS else first[:MAX_MESSAGE_CHARS] + "..."


def _is_unknown_model(message: str) -> bool:
    # Triton prefixes every failed model look-up with "Request for unknown model: ", under
    # NOT_FOUND, UNAVAILABLE or INVALID_ARGUMENT depending on its version and the reason
    # (never loaded, no ready version, not at ready state); older ones say "Inference
    # request for unknown model".
    return "unknown model" in message.lower()


_TRACEBACK = re.compile(r"\n\s*(?:At:|Traceback \(most recent call last\):)\n.*", re.DOTALL)


def without_traceback(message: str) -> str:
    """A server message without the Python traceback Triton's Python backend appends to some ("At: ...")."""
    return _TRACEBACK.sub("", message).rstrip(" ;\n")


def _connection_hint(message: str, *, ssl: bool, client_certificate: bool) -> str:
    """What to change when the connection itself failed, from grpc's reason."""
    if "WRONG_VERSION_NUMBER" in message:
        return "the server does not speak TLS there: connect without ssl=True (without --tls-ca)"
    if "CERTIFICATE_VERIFY_FAILED" in message:
        return (
            "the server's TLS certificate is not signed by a CA you trust, or does not name this host: "
            "pass the CA that signed it as root_certificates"
        )
    if "Socket closed" in message and "failed to connect" in message:  # closed during the handshake
        if not ssl:
            return (
                "the server closed the connection: it may serve TLS only; connect with ssl=True and root_certificates"
            )
        if not client_certificate:
            return (
                "the server closed the TLS connection: it may require a client certificate (mutual TLS); "
                "pass private_key and certificate_chain"
            )
    return "start it with `postsim serve` or check `--url`"


def map_server_error(
    exc: InferenceServerException,
    *,
    url: str,
    model: str | None = None,
    what: str = "",
    timeout_s: float | None = None,
    ssl: bool = False,
    client_certificate: bool = False,
    admin_key: bool = False,
) -> PostSimError:
    """The postsim exception for a tritonclient one; the caller raises it ``from None``.

    ``model`` is the model the call addressed (None for server-wide calls), ``what`` says
    which part of the request it was (``posts 16..19``) and goes into the message. ``ssl``,
    ``client_certificate`` and ``admin_key`` say how the client connected, to word the hint.
    """
    status = _status_name(exc)
    message = without_traceback(str(exc.message() or ""))
    logger.debug("gRPC error from %s (model %s, status %s): %s", url, model, status, message)
    subject = f"model '{model}'" if model else "the server"
    part = f" for {what}" if what else ""

    if "protocol is restricted" in message or "API is restricted" in message:
        key = "the admin key given was refused" if admin_key else "no admin key was given"
        return ServerError(
            f"the server at {url} allows this call (model control, repository index) only with its admin key, "
            f"and {key}: pass admin_key=... (`--admin-key` or POSTSIM_ADMIN_KEY)",
            status=status,
        )
    if _is_unknown_model(message):
        if model in contract.INDEX_MODELS:
            # The client cannot see the server's disk: say what loads the model rather than that no index exists.
            hint = (
                "it is loaded once an index is published: publish one with `postsim index publish`, then retry "
                "(if one is published, the server log says why it is not loaded)"
            )
        elif model:
            hint = "the server may be stopping; otherwise check the log of `postsim serve` for why it did not load"
        else:
            hint = _short(message)
        return ServerError(f"model '{model}' is not loaded on the server at {url}: {hint}", status=status)
    if NO_INDEX_MESSAGE in message:
        return ServerError(f"{subject} cannot answer{part}: {NO_INDEX_MESSAGE}, then retry", status=status)
    if INDEX_NOT_LOADED_MESSAGE in message:
        return ServerError(f"{subject} cannot answer{part} on the server at {url}: {_short(message)}", status=status)
    if INDEX_SEALED_MESSAGE in message:
        return ServerUnavailableError(f"{subject} cannot take the change{part} now: {_short(message)}", status=status)
    unhealthy = unhealthy_stubs(message)
    if unhealthy:
        # Triton says this when a model's process did not answer its one-second health check:
        # the process died, or it is alive and starved of CPU. Which one, only the server knows.
        return ServerError(
            f"Triton judged the process of model '{unhealthy[0].model}' unhealthy on the server at {url} "
            f"(it died, or did not answer Triton's health check in time) and failed {subject}{part}: "
            "`postsim serve` replaces such a process within seconds, so retry; if this persists (or the server is "
            "a bare tritonserver, which never does), restart the server and read its log",
            status=status,
        )
    if is_shared_memory_error(message):
        return ServerError(
            f"{subject} failed{part} on the server at {url}: the server ran out of shared memory "
            f"({_short(message)}). {SHARED_MEMORY_HINT}",
            status=status,
        )
    if any(
        sign in message for sign in (SHUTTING_DOWN_MESSAGE, "Server is stopping", "stopped accepting new inference")
    ):
        return ServerUnavailableError(
            f"the server at {url} is shutting down and refused {subject}{part}: retry once it is back, "
            "or against another server",
            status=status,
        )
    if status == "CANCELLED":
        # postsim's clients never cancel a call, so the server ended it: a gRPC server cancels
        # what is still open when it shuts down.
        return ServerUnavailableError(
            f"the server at {url} ended {subject}{part} before answering: it is most likely shutting down; "
            "retry once it is back, or against another server",
            status=status,
        )
    if status == "UNAVAILABLE":
        if message.startswith(RETRY_SOON_MESSAGES):
            return ServerUnavailableError(f"the server at {url} cannot answer yet: {_short(message)}", status=status)
        if OVERLOADED_MESSAGE in message or "queue" in message.lower():
            return ServerUnavailableError(
                f"the server at {url} is overloaded ({_short(message)}): retry later", status=status
            )
        hint = _connection_hint(message, ssl=ssl, client_certificate=client_certificate)
        return ServerUnavailableError(
            f"cannot reach the postsim server at {url}: {hint} ({_short(message)})",
            status=status,
        )
    if status == "DEADLINE_EXCEEDED":
        limit = f"within {timeout_s:g} s" if timeout_s is not None else "in time"
        return ServerUnavailableError(
            f"the server at {url} did not answer {subject}{part} {limit}: start it with `postsim serve`, "
            "check `--url`, or raise the timeout",
            status=status,
        )
    if status == "INVALID_ARGUMENT":
        # Triton's message names the input it rejected: keep it whole (two misleading ones reworded).
        return InvalidPostError(f"{subject} rejected the request{part}: {explain(message)}")
    if status is None:
        # Raised by tritonclient itself while building the request, before sending it.
        return ServerError(f"could not build the request to {subject}{part}: {_short(message)}")
    return ServerError(f"{subject} failed{part} on the server at {url} ({status}): {_short(message)}", status=status)


def load_error(error: PostSimError, model: str) -> PostSimError:
    """A refused load is the server's verdict on the repository, not a bad post: ServerError."""
    if not isinstance(error, InvalidPostError):
        return error
    reason = str(error).split(": ", 1)[-1]
    return ServerError(
        f"the server did not load model '{model}' and keeps serving the version it had, if any: {reason}",
        status="INVALID_ARGUMENT",
    )


# --------------------------------------------------------------------------- Triton's own refusals

_INPUT_COUNT = re.compile(
    r"expected (?:\d+ inputs|number of inputs between \d+ and \d+) but got \d+ inputs for model '(?P<model>[^']+)'\. "
    r"Got input\(s\) \[(?P<got>[^\]]*)\]"
)
_NO_ELEMENTS = re.compile(
    r"expected \d+ string elements for inference input '(?P<input>[^']+)' "
    r"for model '(?P<model>[^']+)', got 0\b"
)
_QUOTED = re.compile(r"'([^']*)'")


def explain(message: str) -> str:
    """``message`` with Triton's misleading input-count and empty-batch refusals reworded."""
    counted = _INPUT_COUNT.search(message)
    if counted:
        return _input_count(counted) or message
    empty = _NO_ELEMENTS.search(message)
    if empty:
        name, model = empty.group("input"), empty.group("model")
        return (
            f"model '{model}': input '{name}' holds no element: the request holds no post (a batch of 0), "
            f"or no data for its {name}; send at least one post, with one {name} element each (empty bytes for none)"
        )
    return message


def _input_count(found: re.Match[str]) -> str | None:
    model = found.group("model")
    spec = contract.model_specs().get(model)
    if spec is None:  # not a postsim model: its inputs are not known here
        return None
    allowed = spec.input_names
    got = _QUOTED.findall(found.group("got"))
    unexpected = [name for name in got if name not in allowed]
    missing = [name for name in allowed if name not in got]
    problems = ([f"it does not take {unexpected}"] if unexpected else []) + (
        [f"the request lacks {missing}"] if missing else []
    )
    return f"model '{model}' takes the inputs {allowed} and no others: " + "; ".join(problems)
