"""Benchmark harness: load generators, the raw-onnxruntime limit, our server and an MLServer peer.

`make bench` (BENCH_MODE=quick|full) runs `python -m bench`; see bench/README.md.
"""
