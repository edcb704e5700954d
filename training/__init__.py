"""Learns the head (both projections and the fuser) on a user's posts, over cached backbone features (needs the ``train`` and ``export`` extras)."""
