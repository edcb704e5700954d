"""The PyTorch models and the one in-process pipeline of a post.

- :mod:`~postsim.models.modules`: the image encoder, the text encoder and the attention
  fuser (``torch.nn`` modules, each exported to one ONNX model).
- :mod:`~postsim.models.settings` and :mod:`~postsim.models.weights`: which weights to
  build them from (backbones from the hub, a folder, the bundled MiniLM or seeded random;
  the head from a checkpoint or seeded), and building them.
- :mod:`~postsim.models.pipeline`: decode → preprocess → encode → fuse in process, exactly
  as the server computes it, with an ONNX Runtime runtime here and a PyTorch one in
  :mod:`~postsim.models.torch_runtime` (which also gives training its pooled features).

Everything but ``settings`` and ``pipeline`` needs the ``export`` extra (torch, transformers).
"""
