"""``python -m postsim.cli``: the ``postsim`` command without its console script."""

from postsim.cli.main import main

main()
