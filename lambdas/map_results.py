"""What a Distributed Map's ResultWriter exported: every child execution with its input, output or error.

The ResultWriter writes ``manifest.json`` naming ``SUCCEEDED``/``FAILED``/``PENDING`` result files, each a JSON
array (OutputType JSON, the default) or JSON lines (OutputType JSONL) of child executions with ``Input``,
``Output`` (succeeded) or ``Error``/``Cause`` (failed), and ``Status`` (Step Functions developer guide,
"ResultWriter"). The steps that read a Map's results (ingest's split, pack's finish) read them through
:func:`read_children` and decide themselves what a child's output means.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Child:
    """One child execution as the ResultWriter exported it."""

    listed: str  # the result file's status: SUCCEEDED, FAILED or PENDING
    status: str  # the execution's own Status, or ``listed`` where the entry has none
    input: Any  # decoded from the JSON string Step Functions writes; None when absent
    output: Any  # decoded likewise; the entry itself when it has no Output field
    error: str | None
    cause: str | None

    def failure_reason(self, what: str) -> str:
        """``"<what> failed: Error: Cause"`` (the status lower-cased), for a child that gave no usable output."""
        return (f"{what} {self.status.lower()}: {self.error or 'no error name'}: "
                f"{self.cause or 'no cause given'}")


def json_documents(text: str) -> list[Any]:
    """A ResultWriter file: a JSON array (OutputType JSON, the default) or JSON lines (OutputType JSONL)."""
    stripped = text.strip()
    if not stripped:
        return []
    if stripped.startswith("["):
        return json.loads(stripped)
    return [json.loads(line) for line in stripped.splitlines() if line.strip()]


def _maybe_json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def read_children(s3: Any, bucket: str, manifest_key: str) -> Iterator[Child]:
    """Every child execution listed by the manifest at ``s3://bucket/manifest_key``, file by file."""
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=manifest_key)["Body"].read())
    files = manifest.get("ResultFiles", {})
    for listed in ("SUCCEEDED", "FAILED", "PENDING"):
        for entry in files.get(listed, []):
            text = s3.get_object(Bucket=bucket, Key=entry["Key"])["Body"].read().decode()
            for execution in json_documents(text):
                yield Child(
                    listed=listed,
                    status=str(execution.get("Status", listed)),
                    input=_maybe_json(execution.get("Input")),
                    output=_maybe_json(execution.get("Output")) if "Output" in execution else execution,
                    error=execution.get("Error"),
                    cause=execution.get("Cause"),
                )
