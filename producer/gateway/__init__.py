"""The OpenAI-compatible HTTP gateway (`pravaha serve`): a producer in front of the Redis queue.

It never loads a model: requests become jobs on the stream, tokens come back from the
per-request channels, so any number of gateways front any number of workers. `config` imports
nothing heavy; `app` needs the `serve` extra (FastAPI, uvicorn).
"""
