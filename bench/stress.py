"""``postsim bench stress``: index builds, publish/rollback cycles and deadline storms at once, on a starved CPU.

What crashed Triton 2.51 under postsim (issue 8) needed several things at the same time:
a machine saturated by other work, ``index build`` embedding posts, index versions
published and rolled back, and clients whose deadlines expire. This runs all of them
together for ``duration_s`` against a server it starts on a scratch copy of the repository:

- ``busy_processes`` processes that spin on the CPU (each ends by itself at the deadline);
- a loop that builds an index of a sample corpus through the server (``postsim index
  build``, in its own process), publishes it, publishes it again, rolls back, and queries
  ``similar_posts`` in between;
- ``storm_clients`` clients each sending ``storm_rate`` requests a second with a 10 ms
  deadline, to both ensembles in turn (every one of them abandoned in Triton's midst);
- a probe of ``/v2/health/ready`` twice a second.

The verdict (:attr:`StressReport.ok`): tritonserver never crashed (no restart, no signal in
its log), and readiness never stayed false longer than ``STUCK_READINESS_S``.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from postsim.bench.serving import loopback_settings, scratch_repository
from postsim.client.api import PostSimClient
from postsim.client.core import build_inputs
from postsim.client.errors import without_traceback
from postsim.core.errors import BenchError, PostSimError
from postsim.corpus.posts import read_posts
from postsim.corpus.samples import write_sample_posts
from postsim.indexing.publish import publish_index, rollback_index
from postsim.model_repository import contract
from postsim.server.launcher import TritonServer

logger = logging.getLogger("postsim")

STUCK_READINESS_S = 30.0
"""Readiness false for longer than this, while the server answers, is a stuck server."""
STORM_DEADLINE_S = 0.01
_ENSEMBLES = (contract.POST_EMBEDDING, contract.SIMILAR_POSTS)
_CRASH = re.compile(r"Signal \((?!15\))\d+\) received|terminate called")
"""A crash in tritonserver's log (signal 15 is the stop postsim itself sends)."""


@dataclass(frozen=True, kw_only=True)
class StressSettings:
    repository: Path
    duration_s: float = 300.0
    busy_processes: int = 4
    """Processes spinning on the CPU while the load runs (the machine's other work)."""
    storm_clients: int = 2
    storm_rate: float = 20.0
    """Requests a second each storm client sends (each abandoned after 10 ms)."""
    corpus_posts: int = 48
    work_dir: Path | None = None

    def __post_init__(self) -> None:
        counts = (self.busy_processes, self.storm_clients)
        if self.duration_s <= 0 or self.storm_rate <= 0 or min(counts) < 0 or self.corpus_posts < 2:
            raise BenchError(
                "the stress run needs a positive duration and storm rate, at least 2 corpus posts, and no negative "
                f"counts; got duration {self.duration_s} s, storm rate {self.storm_rate}/s, {self.corpus_posts} posts, "
                f"{self.busy_processes} busy processes, {self.storm_clients} storm clients"
            )


@dataclass(kw_only=True)
class StressReport:
    seconds: float = 0.0
    busy_processes: int = 0
    load_average: tuple[float, float] = (0.0, 0.0)
    """The 1-minute load average at the start and at the end."""
    builds: int = 0
    posts_indexed: int = 0
    post_failures: Counter[str] = field(default_factory=Counter)
    publishes: int = 0
    rollbacks: int = 0
    similar_queries: int = 0
    cycle_errors: Counter[str] = field(default_factory=Counter)
    storm: Counter[str] = field(default_factory=Counter)
    """Outcomes of the 10 ms-deadline requests: answered, DEADLINE_EXCEEDED, other statuses."""
    ensemble_requests_run: int = 0
    """Requests tritonserver ran to either ensemble (its metrics): the storm's abandoned ones among them."""
    readiness_checks: int = 0
    not_ready_checks: int = 0
    longest_not_ready_s: float = 0.0
    ready_at_end: bool = False
    restarts: int = 0
    crashes_in_log: int = 0
    stubs_ended: int = 0
    """Live stubs Triton judged unhealthy, ended before they could answer (see TritonServer.on_unhealthy_stub)."""
    stubs_reloaded: int = 0
    """Models reloaded because a stub had died."""

    @property
    def ok(self) -> bool:
        return (
            self.restarts == 0
            and self.crashes_in_log == 0
            and self.ready_at_end
            and self.longest_not_ready_s <= STUCK_READINESS_S
        )


def _spin(until: float) -> None:
    """A busy process: burns a core until ``until`` (time.time()), then ends by itself."""
    while time.time() < until:
        pass


def _short(message: str) -> str:
    first = without_traceback(message).splitlines()[0] if message.strip() else "?"
    return re.sub(r"\d+", "N", first)[:160]


class _Run:
    """The load of one stress run against a running server."""

    def __init__(self, server: TritonServer, corpus: Path, work_dir: Path, report: StressReport) -> None:
        self.server = server
        self.url = server.endpoints.grpc
        self.corpus = corpus
        self.work_dir = work_dir
        self.report = report
        self.done = threading.Event()
        self.lock = threading.Lock()

    def cycles(self) -> None:
        """Build an index, publish it twice, roll back once, query in between; again, until done."""
        report, query = self.report, next(read_posts(self.corpus)).to_post()
        while not self.done.is_set():
            try:
                index_dir = self._build()
                with PostSimClient(self.url, timeout_s=120) as client:
                    for step in ("publish", "similar", "publish", "rollback", "similar"):
                        if self.done.is_set():
                            break
                        if step == "publish":
                            publish_index(index_dir, self.server.repository, client=client)
                            report.publishes += 1
                        elif step == "rollback":
                            rollback_index(self.server.repository, client=client)
                            report.rollbacks += 1
                        else:
                            client.similar(query, k=5)
                            report.similar_queries += 1
            except PostSimError as error:
                with self.lock:
                    report.cycle_errors[_short(str(error))] += 1
                self.done.wait(1.0)

    def _build(self) -> Path:
        """``postsim index build`` of the corpus, as an operator runs it (its own process); the index folder."""
        index_dir = self.work_dir / "index"
        command = [sys.executable, "-m", "postsim.cli", "index", "build", str(self.corpus)]
        command += ["--out", str(index_dir), "--url", self.url, "--max-failures", str(1 << 30)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            reason = next(iter(result.stderr.strip().splitlines()[-1:]), f"exit code {result.returncode}")
            raise BenchError(f"index build failed: {reason}")
        indexed = re.search(r"indexed (\d+) posts", result.stdout)
        refused = re.findall(r"^  [^:]+: (.*)$", result.stderr, re.M)
        with self.lock:
            self.report.builds += 1
            self.report.posts_indexed += int(indexed[1]) if indexed else 0
            self.report.post_failures.update(_short(reason) for reason in refused)
        return index_dir

    def storm(self, rate: float) -> None:
        """Requests with a 10 ms deadline, ``rate`` a second, to both ensembles in turn."""
        inputs = {
            contract.POST_EMBEDDING: build_inputs([next(read_posts(self.corpus)).to_post()]),
            contract.SIMILAR_POSTS: build_inputs([next(read_posts(self.corpus)).to_post()], k=5),
        }
        with grpcclient.InferenceServerClient(self.url) as client:
            sent = 0
            next_at = time.monotonic()
            while not self.done.wait(max(0.0, next_at - time.monotonic())):
                next_at += 1 / rate
                ensemble = _ENSEMBLES[sent % len(_ENSEMBLES)]
                sent += 1
                try:
                    client.infer(ensemble, inputs[ensemble], client_timeout=STORM_DEADLINE_S)
                    outcome = "answered"
                except InferenceServerException as error:
                    outcome = str(error.status()).removeprefix("StatusCode.")
                with self.lock:
                    self.report.storm[outcome] += 1

    def probe(self) -> None:
        """``/v2/health/ready`` twice a second; the longest stretch it stayed false."""
        url = f"{self.server.endpoints.http}/v2/health/ready"
        report, not_ready_since = self.report, None
        while not self.done.wait(0.5):
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    ready = response.status == 200
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                ready = False
            report.readiness_checks += 1
            now = time.monotonic()
            if ready:
                not_ready_since = None
                continue
            report.not_ready_checks += 1
            not_ready_since = not_ready_since or now
            report.longest_not_ready_s = max(report.longest_not_ready_s, now - not_ready_since)


def run_stress(settings: StressSettings) -> StressReport:
    """Run the load for ``settings.duration_s`` on a CPU kept busy; the report says what happened."""
    report = StressReport(busy_processes=settings.busy_processes)
    with contextlib.ExitStack() as stack:
        work_dir = settings.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="postsim-stress-")))
        work_dir.mkdir(parents=True, exist_ok=True)
        corpus = write_sample_posts(settings.corpus_posts, work_dir / "corpus", seed=3)
        served = scratch_repository(settings.repository.resolve(), work_dir / "repository")
        server = stack.enter_context(TritonServer(loopback_settings(served), log_path=work_dir / "tritonserver.log"))
        run = _Run(server, corpus, work_dir, report)
        started = time.monotonic()
        until = time.time() + settings.duration_s
        spawn = multiprocessing.get_context("spawn")
        busy = [spawn.Process(target=_spin, args=(until,), daemon=True) for _ in range(settings.busy_processes)]
        for process in busy:
            process.start()
        report.load_average = (os.getloadavg()[0], 0.0)
        threads = [threading.Thread(target=run.cycles, name="stress-cycles")]
        threads += [
            threading.Thread(target=run.storm, args=(settings.storm_rate,), name=f"stress-storm-{n}")
            for n in range(settings.storm_clients)
        ]
        threads.append(threading.Thread(target=run.probe, name="stress-probe"))
        for thread in threads:
            thread.start()
        try:
            while time.time() < until:
                time.sleep(min(5.0, max(0.0, until - time.time())))
                logger.info(
                    "stress: %.0f s, %d builds, %d publishes, %d rollbacks, storm %s, restarts %d",
                    time.monotonic() - started,
                    report.builds,
                    report.publishes,
                    report.rollbacks,
                    dict(report.storm),
                    server.restarts,
                )
        finally:
            report.load_average = (report.load_average[0], os.getloadavg()[0])
            run.done.set()
            for process in busy:
                process.terminate()
            for thread in threads:
                thread.join()
        report.seconds = time.monotonic() - started
        with PostSimClient(server.endpoints.grpc) as client:
            report.ready_at_end = client.is_ready()
        report.ensemble_requests_run = _ensemble_requests_run(server.endpoints.metrics)
        report.restarts = server.restarts
        report.stubs_ended = len(server.ended_stubs)
        report.stubs_reloaded = len(server.dead_stub_models)
        report.crashes_in_log = len(_CRASH.findall(server.log_text()))
    return report


def _ensemble_requests_run(metrics_url: str) -> int:
    """Requests tritonserver finished for the ensembles, answered or failed, from its Prometheus metrics."""
    with urllib.request.urlopen(metrics_url, timeout=30) as response:
        text = response.read().decode()
    pattern = re.compile(
        r'^nv_inference_request_(?:success|failure)\{[^}]*model="(?:' + "|".join(_ENSEMBLES) + r')"[^}]*\} (\S+)$', re.M
    )
    return int(sum(float(value) for value in pattern.findall(text)))


def format_stress(report: StressReport) -> str:
    """The report as Markdown: a verdict, then what ran and how it went."""
    verdict = "no crash, no stuck readiness" if report.ok else "FAILED"
    storm_total = sum(report.storm.values())
    lines = [
        f"Stress for {report.seconds:.0f} s with {report.busy_processes} busy processes "
        f"(load average {report.load_average[0]:.1f} at the start, {report.load_average[1]:.1f} at the end): "
        f"{verdict}.",
        "",
        "| | |",
        "|---|---|",
        f"| index builds | {report.builds} ({report.posts_indexed} posts indexed, "
        f"{sum(report.post_failures.values())} refused) |",
        f"| publishes / rollbacks / similar queries | {report.publishes} / {report.rollbacks} / "
        f"{report.similar_queries} |",
        f"| 10 ms-deadline requests | {storm_total}: "
        + ", ".join(f"{outcome} {count}" for outcome, count in report.storm.most_common())
        + " |",
        f"| requests tritonserver ran to the ensembles (its metrics; abandoned ones included) | "
        f"{report.ensemble_requests_run} |",
        f"| readiness | {report.not_ready_checks} of {report.readiness_checks} probes not ready, longest "
        f"{report.longest_not_ready_s:.1f} s; ready at the end: {'yes' if report.ready_at_end else 'NO'} |",
        f"| tritonserver restarts / crashes in its log | {report.restarts} / {report.crashes_in_log} |",
        f"| stubs Triton judged unhealthy while alive, ended / models reloaded after a stub died | "
        f"{report.stubs_ended} / {report.stubs_reloaded} |",
    ]
    errors = report.post_failures + report.cycle_errors
    if errors:
        lines += ["", "| error | count |", "|---|---:|"]
        lines += [f"| {message.replace('|', '/')} | {count} |" for message, count in errors.most_common()]
    return "\n".join(lines)
