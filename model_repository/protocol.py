"""What ``postsim serve`` and its clients agree on besides the tensors: headers, answers, Triton's words.

The server (``postsim.server``: the launcher and the front end) and the client
(``postsim.client``) both import this module and neither imports the other:

- the headers that carry the admin key and Triton's per-start key, and the environment
  variable the admin key may come from;
- the openings of the front end's UNAVAILABLE answers, which clients recognise to say
  "retry" rather than "cannot reach the server";
- how Triton words two failures that both sides recognise in an error or a log line: a
  Python-backend process it judged unhealthy, and a Python backend short of ``/dev/shm``.
"""

from __future__ import annotations

import re
from typing import NamedTuple

ADMIN_KEY_VARIABLE = "POSTSIM_ADMIN_KEY"
"""Where ``postsim serve`` and ``postsim index publish`` may read the admin key from (the CLI's envvar)."""
RESTRICTED_HEADER = "postsim-admin-key"
"""The HTTP request header that carries the admin key."""
GRPC_RESTRICTED_HEADER = f"triton-grpc-protocol-{RESTRICTED_HEADER}"
"""The same over gRPC: the name Triton's gRPC server gives a restricted-protocol header, which clients already send."""
INTERNAL_HEADER = "postsim-internal-key"
"""The HTTP header of the key tritonserver requires on every API but health (gRPC: prefixed like the admin key's)."""
GRPC_INTERNAL_HEADER = f"triton-grpc-protocol-{INTERNAL_HEADER}"

STARTING_MESSAGE = "the server is starting"
RESTARTING_MESSAGE = "the server is restarting"
LOST_CONNECTION_MESSAGE = "the server lost its connection"
LOST_TRITON_MESSAGE = (
    f"{LOST_CONNECTION_MESSAGE} to tritonserver (it may have died and be restarting): retry in a few seconds"
)
RETRY_SOON_MESSAGES = (STARTING_MESSAGE, RESTARTING_MESSAGE, LOST_CONNECTION_MESSAGE)
"""Openings of the front end's UNAVAILABLE answers that mean "retry in a few seconds"."""
SHUTTING_DOWN_MESSAGE = "the server is shutting down"
OVERLOADED_MESSAGE = "the server is overloaded"

_UNHEALTHY_STUB = re.compile(r"Stub process '(?P<instance>(?P<model>[^']+?)(?:_\d+)*)' is not healthy")
"""Triton's Python backend gave up on a process: dead, or alive and too slow to answer its health check."""


class UnhealthyStubMessage(NamedTuple):
    instance: str
    """The model instance, the stub's name (``fuser_0_0``)."""
    model: str
    """The model it serves (``fuser``)."""


def unhealthy_stubs(message: str) -> list[UnhealthyStubMessage]:
    """The stubs a Triton error says it judged unhealthy ("Stub process '...' is not healthy"), in order."""
    return [UnhealthyStubMessage(found["instance"], found["model"]) for found in _UNHEALTHY_STUB.finditer(message)]


SHARED_MEMORY_HINT = (
    "Triton's Python backend passes every tensor through shared memory in /dev/shm and could not get "
    "enough: give the server more (`docker run --shm-size=2g`, `shm_size: 2gb` in compose; `df -h /dev/shm` "
    "shows what there is), or lower what each model process starts with, ServerSettings.shm_default_bytes "
    "(`postsim serve --shm-default-bytes`, at least 4 MiB)"
)
_SHARED_MEMORY_ERRORS = ("shared memory pool size", "Unable to initialize shared memory", "shm-default-byte-size")


def is_shared_memory_error(message: str) -> bool:
    """Whether a Triton error or log line is the Python backend running out of /dev/shm."""
    return any(pattern in message for pattern in _SHARED_MEMORY_ERRORS)
