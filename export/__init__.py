"""Turns the PyTorch models into ONNX and writes the Triton model repository (needs the ``export`` extra)."""
