"""``postsim export``: the models to ONNX and the Triton model repository (torch: the export extra, imported on use)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from postsim.cli.backbones import (
    DimOption,
    ImageModelOption,
    SeedOption,
    SizeOption,
    TextModelOption,
    WeightsOption,
    model_settings,
)
from postsim.cli.common import RepositoryOption, choice, reports_errors, stdout
from postsim.model_repository import contract


@reports_errors
def export(
    repository: RepositoryOption,
    target: Annotated[
        str, typer.Option(help="embedded (Python backend + ONNX Runtime) or triton (NGC, GPU, TensorRT).")
    ] = "embedded",
    weights: WeightsOption = "pretrained",
    dim: DimOption = contract.DEFAULT_DIM,
    text_model: TextModelOption = None,
    image_model: ImageModelOption = None,
    head: Annotated[
        Path | None, typer.Option(help="Head checkpoint (projections and fuser) written by `postsim train`.")
    ] = None,
    size: SizeOption = None,
    seed: SeedOption = None,
    precision: Annotated[str, typer.Option(help="fp32; int8 (quantised encoders, CPU); fp16 (GPU).")] = "fp32",
    force_precision: Annotated[
        bool, typer.Option(help="Write int8/fp16 models even when they agree with fp32 below 0.99 mean cosine.")
    ] = False,
    retrieval: Annotated[
        str,
        typer.Option(
            help="faiss (an index in the server's process) or milvus (a Milvus collection every replica shares)."
        ),
    ] = contract.RetrievalBackend.FAISS.value,
    milvus_uri: Annotated[
        str, typer.Option(help="The Milvus holding the posts, http://HOST:19530 (with --retrieval milvus only).")
    ] = "",
    thread_policy: Annotated[
        str | None,
        typer.Option(
            help="ONNX Runtime threads per session (embedded target): lone-post (one thread per session, two for the "
            "image encoder while its post is the only one in the server), one (one thread always), image-two or "
            "encoders-two (two threads always: one post sooner, lower peak). README, Performance.",
            show_default="lone-post",
        ),
    ] = None,
) -> None:
    """Export the image encoder, text encoder and fuser to ONNX and write the Triton model repository."""
    from postsim.core.errors import SettingsError
    from postsim.export.quantize import Precision
    from postsim.export.repository import ExportOptions, export_repository
    from postsim.export.triton_config import DEFAULT_THREAD_POLICY, ServingSettings, Target, ThreadPolicy

    retrieval_settings = contract.RetrievalSettings(
        backend=choice(contract.RetrievalBackend, retrieval, "--retrieval"), milvus_uri=milvus_uri
    )
    chosen_target = choice(Target, target, "--target")
    policy = DEFAULT_THREAD_POLICY if thread_policy is None else choice(ThreadPolicy, thread_policy, "--thread-policy")
    if chosen_target is not Target.EMBEDDED and thread_policy is not None:
        raise SettingsError(
            f"--thread-policy {thread_policy} would be ignored: it sets the ONNX Runtime sessions of the embedded "
            f"target, and --target {target} serves the models through Triton's own backends"
        )
    options = ExportOptions(
        repository=repository,
        retrieval=retrieval_settings,
        target=chosen_target,
        serving=ServingSettings.for_target(chosen_target).with_thread_policy(policy)
        if chosen_target is Target.EMBEDDED
        else None,
        precision=choice(Precision, precision, "--precision"),
        force_precision=force_precision,
        models=model_settings(weights, dim, text_model, image_model, size, seed, head=head),
    )
    report = export_repository(options)
    for name, check in report.validation.items():
        stdout.print(f"{name}: {check}")
    if report.agreement is not None:
        stdout.print(f"{precision} agreement with fp32: {report.agreement}")
    stdout.print(f"repository ready: {report.repository} (weights fingerprint {report.manifest.fingerprint})")
