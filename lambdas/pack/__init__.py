"""Packing: each split of an ingested run written as tar shards (ml/shards.py's format) for training.

Three functions, one per step of the pack stage (see infra/pack.py): ``plan`` ($.ingest -> the list of shards
to make, one Distributed Map item each), ``packer`` (one item -> one shard under ``shards/<run>/<split>/``),
``finish`` (map results -> the pack report and ``$.pack``, the channels training reads).
"""
