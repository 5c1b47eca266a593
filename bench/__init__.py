"""Benchmarks: ``python -m bench`` (``make bench``). Not tests: nothing here asserts a time.

Each benchmark module exposes ``run(ctx: bench.common.Context) -> dict`` and its result lands in
``bench/results/<name>.json``; ``bench/results/summary.json`` and ``bench/results/README.md`` (the Markdown
table) gather them with the machine, the date, the torch version and the thread count.
"""
