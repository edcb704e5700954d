"""Latency and throughput benchmarks of postsim against in-process baselines."""
