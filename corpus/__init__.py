"""Corpora of posts: the ``posts.jsonl`` format, the held-out split, and sample corpora to try postsim on.

- :mod:`~postsim.corpus.posts`: reading and checking a corpus (ids, text, image, label, split).
- :mod:`~postsim.corpus.split`: which posts are held out, the same in training and evaluation.
- :mod:`~postsim.corpus.samples`: the synthetic sample-post generator (``postsim sample-posts``).
"""
