"""Benchmarks of distmed on the machine at hand (issue #7), run from the repository root.

`python -m benchmarks.throughput`: training images/s and peak memory, distmed through Ray
Train vs the same loop without Ray vs a hand-written ImageFolder baseline.
`python -m benchmarks.datapath`: images/s delivered to the model, and the cost of the cache.
"""
