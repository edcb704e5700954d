"""How postsim sets up an ONNX Runtime session, in the server and in process alike."""

from __future__ import annotations

import onnxruntime as ort


def session_options(*, threads: int = 0, spinning: bool = True, quiet: bool = False) -> ort.SessionOptions:
    """Every graph optimisation, one inter-op thread, ``threads`` intra-op threads (0: ONNX Runtime's choice).

    ``spinning`` False makes idle pool threads sleep instead of spinning, so that other
    processes (the other models of the server) get the cores. ``quiet`` keeps warnings out of
    the log (fp16 models on the CPU warn about every cast ONNX Runtime inserts).
    """
    options = ort.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if quiet:
        options.log_severity_level = 3
    return options
