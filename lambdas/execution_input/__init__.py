"""The pipeline's execution input: one schema (schema.py), the first state that checks it (check.py), and the
document generated from it (docs.py)."""
