"""Benchmarks of the engine and the worker: `pravaha bench` runs `benchmarks.throughput.run`.

Kept out of `worker/`, because a benchmark measures every layer (kernels, engine, Redis) and
may reach into any of them; the service itself may not.
"""
