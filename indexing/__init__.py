"""Indexes of posts: embedding a corpus through the server, FAISS index folders, and publishing them.

- :mod:`~postsim.indexing.embed`: ``postsim index build``, a corpus embedded through the
  running server's ``post_embedding`` and written as an index folder.
- :mod:`~postsim.indexing.build`: choosing, building, tuning and atomically writing a FAISS
  index folder (``postsim.model_repository.search_index`` reads what this writes).
- :mod:`~postsim.indexing.publish`: ``postsim index publish`` and ``rollback``, index versions
  of the ``retrieval`` model.
"""
