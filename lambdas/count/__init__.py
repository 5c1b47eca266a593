"""Counting: the count Lambda (one upload at a time, from SQS) and bulk counting (Batch Transform)."""
