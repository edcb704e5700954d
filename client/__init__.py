"""postsim command line and gRPC client: embed posts, build and publish indexes, find similar posts."""
