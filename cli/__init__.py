"""The ``postsim`` command: one module per command group, each parsing options and calling a typed function.

It sits on top of every other package (it drives the server, export, indexing and the bench,
which use the client), so it is its own package rather than part of client/: there it would make
client/ import indexing/, which imports client/.
"""
