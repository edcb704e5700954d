"""``postsim serve``: tritonserver behind postsim's front end, supervised.

- :mod:`~postsim.server.launcher`: :class:`~postsim.server.launcher.TritonServer` and its
  settings: starts the front end and tritonserver, restarts what dies, stops in order.
- :mod:`~postsim.server.front_end`: the process clients talk to (TLS, the admin key,
  shielding Triton from cancellations), run as a child of the launcher.
- :mod:`~postsim.server.watchdog`: reloads a model whose Python-backend process died.
- :mod:`~postsim.server.processes`: tritonserver's processes as ``/proc`` shows them.
- :mod:`~postsim.server.shared_memory`: what ``/dev/shm`` the Python backend needs.
- :mod:`~postsim.server.install`: a runnable layout of the nvidia-pytriton wheel's tritonserver.
- :mod:`~postsim.server.ports`: free ports, and taken ones named with the option to change.
"""
