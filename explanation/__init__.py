"""``postsim explain`` and ``postsim ui``'s explanations: targets from an index, pictures, tables and JSON.

The attributions themselves are measured by the client (:mod:`postsim.client.explain`);
this package finds what to compare with (an indexed post's stored embedding,
:mod:`postsim.explanation.targets`) and shows the result (:mod:`postsim.explanation.render`).
"""
