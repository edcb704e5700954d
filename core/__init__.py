"""What every part of postsim shares, and nothing else.

- :mod:`postsim.core.errors`: the one exception family (:class:`~postsim.core.errors.PostSimError`
  and its subclasses), whose messages say what to do.
- :mod:`postsim.core.files`: writing files atomically, text and bytes.
- :mod:`postsim.core.paths`: where postsim writes and caches by default (``POSTSIM_HOME``).

Every module logs through one logger, ``logger = logging.getLogger("postsim")``: the CLI
decides what it shows, the Python-backend models forward it to Triton's log, and library
code never prints.
"""
