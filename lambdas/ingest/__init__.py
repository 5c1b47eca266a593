"""Ingestion: select an ABID subset, copy it server-side into raw/ of the data bucket, split it for training.

Three functions, one per step of the ingest stage (see infra/ingest.py):
``select`` (request -> selection list), ``worker`` (one Distributed Map batch -> copies and records),
``split`` (map results -> records, train/validation/test manifests and the ingest report).
"""
