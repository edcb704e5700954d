"""Reloads a model whose Python-backend process died: Triton 2.51 neither restarts it nor reports it."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from postsim.core.errors import PostSimError
from postsim.server.processes import StubProcess, dead_children, describe_wait_status

if TYPE_CHECKING:
    from postsim.server.launcher import TritonServer

logger = logging.getLogger("postsim")

NORMAL_EXIT_GRACE_S = 5.0
"""How long a stub that exited with code 0 may wait to be reaped by Triton before the watchdog calls it dead."""


class StubWatchdog:
    """Reloads a model whose Python-backend stub died: Triton 2.51 neither restarts it nor reports it.

    A stub that exits because Triton unloads its model is reaped by Triton; one that dies
    otherwise stays a zombie child of tritonserver, which is what this looks for. Its
    command line is gone by then, so the model each live stub serves is noted on every look.
    """

    def __init__(self, server: TritonServer, interval_s: float) -> None:
        self.server = server
        self.interval_s = interval_s
        self._known: dict[int, StubProcess] = {}
        self._handled: set[int] = set()
        self._exited: dict[int, float] = {}
        """Zombies that exited with code 0, by when first seen: Triton may be about to reap them."""
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="postsim-stub-watchdog", daemon=True)

    def start(self) -> None:
        process = self.server.process
        if process is not None:
            earlier = dead_children(process.pid)
            if earlier:
                logger.warning(
                    "tritonserver has %d dead Python-backend process(es) from before the watchdog started; the models "
                    "they served fail until reloaded (TritonServer.reload_model)",
                    len(earlier),
                )
                self._handled.update(earlier)
                self.server.dead_stubs_unseen += len(earlier)
        self.check()  # note the stubs of the models loaded at start
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.server.settings.startup_timeout_s)

    def _watch(self) -> None:
        while not self._stopping.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # the watchdog must outlive whatever one look ran into
                logger.exception("the stub watchdog failed to check tritonserver's processes")

    def check(self) -> list[str]:
        """One look: reload the models whose stubs died since the last; returns their names."""
        process = self.server.process
        if process is None or process.poll() is not None:
            return []
        for live in self.server.stubs():
            self._known[live.pid] = live
        reloaded = []
        dead = dead_children(process.pid)
        self._exited = {pid: seen for pid, seen in self._exited.items() if pid in dead}  # reaped meanwhile: forget
        for pid, status in dead.items():
            if pid in self._handled or self._stopping.is_set():
                continue
            if status == 0:
                # A stub Triton ends (a model unloaded, a version retired) exits 0 and is reaped by
                # Triton at once; one that stays a zombie exited on its own.
                seen = self._exited.setdefault(pid, time.monotonic())
                if time.monotonic() - seen < NORMAL_EXIT_GRACE_S:
                    continue
            self._handled.add(pid)
            stub = self._known.pop(pid, None)
            if stub is not None:
                self.server.dead_stub_models.append(stub.model)
            if self._recover(pid, status, stub):
                assert stub is not None
                reloaded.append(stub.model)
        return reloaded

    def _recover(self, pid: int, status: int, stub: StubProcess | None) -> bool:
        how = describe_wait_status(status)
        if stub is None:
            logger.error(
                "a Python-backend process of tritonserver (pid %d) %s before postsim saw which model it served; "
                'requests to that model fail with "Stub process ... is not healthy" until it is reloaded: '
                "restart `postsim serve`",
                pid,
                how,
            )
            return False
        logger.error(
            "model '%s' (version %s): its Python-backend process (pid %d) %s. Triton does not restart it and "
            'keeps reporting the model ready while every request to it fails ("Stub process is not healthy"): '
            "reloading '%s'",
            stub.model,
            stub.version,
            pid,
            how,
            stub.model,
        )
        try:
            self.server.reload_model(stub.model, changed_file=stub.model_file)
        except PostSimError as error:
            logger.error("model '%s' could not be reloaded (%s): restart `postsim serve`", stub.model, error)
            return False
        logger.info("model '%s' reloaded after its process died: serving again", stub.model)
        return True
