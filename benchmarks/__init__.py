"""Benchmark suite of onnxformer against its peers (see benchmarks/RESULTS.md). Not installed."""
