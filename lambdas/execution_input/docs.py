"""docs/execution-input.md, generated from the execution-input schema (lambdas/execution_input/schema.py).

Every key, type, bound and allowed value comes from the schema's own JSON Schema, so the document cannot list a
key the pipeline refuses or miss one it accepts; only the one-line meanings are written here, and
tests/lambdas/test_execution_input.py fails when a schema key has none (or a meaning names no key), and when the
committed document differs from what this module writes. Regenerate after changing a request model::

    .venv/bin/python -m lambdas.execution_input.docs
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from lambdas.execution_input.schema import MAX_INPUT_BYTES, STATE_PAYLOAD_LIMIT_BYTES, ExecutionInput

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "execution-input.md"

# What each key means, by its dotted path. The facts (type, bounds, choices) are the schema's.
MEANINGS: dict[str, str] = {
    "dataset": "Which photos to ingest and how to split them (the ingest stage).",
    "dataset.selector": "How photos are chosen; default: the stack's `datasetSelector`.",
    "dataset.minCount": "Fewest objects per photo, with selector `count-range` (default 0).",
    "dataset.maxCount": "Most objects per photo, with selector `count-range` (default 5).",
    "dataset.challengeSplit": "The counting challenge's list, with selector `challenge` (default `train`).",
    "dataset.manifestUri": "Your list of image ids under `manifests/` of the data bucket, with selector `manifest` "
                           "(it expires with the runs' lists after `shardRetentionDays`).",
    "dataset.sourceBucket": "Must be the bucket the stack reads (`sourceBucket`); another one is refused.",
    "dataset.limit": "Take at most this many photos.",
    "dataset.validationFraction": "Share of photos for validation; default: `splitValidationFraction`.",
    "dataset.testFraction": "Share of photos for test; default: `splitTestFraction`.",
    "dataset.seed": "Seed of the split, so a rerun splits alike (default `invmon`).",
    "dataset.includeReviewed": "Whether photos labelled by reviewers (`raw/reviewed/`) join the train split; "
                               "validation and test stay ABID's (default true).",
    "training": "The training (or tuning) job (the training stage); every key defaults to the stack's setting.",
    "training.instanceType": "Training instance type; must be in `trainingAllowedInstanceTypes`.",
    "training.instanceCount": "Instances per job; at most `trainingMaxInstanceCount`.",
    "training.useSpot": "Managed spot training; default: `trainingUseSpot`.",
    "training.maxRuntimeSeconds": "The job's MaxRuntimeInSeconds; at most `trainingMaxSeconds`.",
    "training.maxWaitSeconds": "Spot jobs' MaxWaitTimeInSeconds (at least maxRuntimeSeconds); at most "
                               "`trainingMaxSeconds`.",
    "training.volumeSizeGb": "The instance's storage volume, in GB.",
    "training.networkIsolation": "`false` is refused unless the stack sets `allowNetworkIsolationOff`.",
    "training.epochs": "The trainer's `--epochs`, checked by the trainer's own argument parser.",
    "training.hyperparameters": "More trainer arguments (`--name value`), each checked by the trainer's parser.",
    "training.pretrained": "Starting weights: an `s3://` URI under `models/` or `raw/` of the data bucket.",
    "training.tuning": "A hyperparameter tuning job in place of one training job.",
    "training.tuning.enabled": "Tune; default: `tuningEnabled`.",
    "training.tuning.maxJobs": "Training jobs in all; at most `tuningMaxJobsCap`.",
    "training.tuning.maxParallelJobs": "Training jobs at once; at most `tuningMaxParallelJobsCap` and maxJobs.",
    "training.tuning.learningRate": "`[low, high]` searched on a log scale.",
    "training.tuning.batchSizes": "Batch sizes to try.",
    "training.tuning.epochs": "`[low, high]` epochs to try.",
    "deploy": "How the deploy gate decides (the deploy stage).",
    "deploy.force": "Deploy whatever the metrics say; refused unless the stack sets `allowForceDeploy`.",
    "deploy.minImprovement": "Accuracy the new model must gain over the one in service; default: "
                             "`deployMinImprovement`.",
}

ALLOWANCES = (
    ("allowNetworkIsolationOff", "`training.networkIsolation: false`"),
    ("trainingAllowedInstanceTypes", "`training.instanceType`"),
    ("trainingMaxInstanceCount", "`training.instanceCount`"),
    ("trainingMaxSeconds", "`training.maxRuntimeSeconds`, `training.maxWaitSeconds`"),
    ("tuningMaxJobsCap", "`training.tuning.maxJobs`"),
    ("tuningMaxParallelJobsCap", "`training.tuning.maxParallelJobs`"),
    ("allowForceDeploy", "`deploy.force: true`"),
)


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        return defs[schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _without_null(schema: dict[str, Any]) -> list[dict[str, Any]]:
    options = schema.get("anyOf", [schema])
    return [option for option in options if option.get("type") != "null"]


def type_of(schema: dict[str, Any], defs: dict[str, Any]) -> str:
    """A JSON Schema as one short phrase: ``integer >= 0``, ``"train" | "validation"``, ``[number, number]``."""
    parts = []
    for option in _without_null(schema):
        option = _resolve(option, defs)
        if "enum" in option:
            parts.append(" \\| ".join(json.dumps(value) for value in option["enum"]))
        elif "const" in option:
            parts.append(json.dumps(option["const"]))
        elif "prefixItems" in option:
            parts.append("[" + ", ".join(type_of(item, defs) for item in option["prefixItems"]) + "]")
        elif option.get("type") == "array":
            bound = f", at least {option['minItems']}" if option.get("minItems") else ""
            parts.append(f"list of {type_of(option.get('items', {}), defs)}{bound}")
        elif option.get("type") == "object" and "properties" in option:
            parts.append("object (below)")
        elif option.get("type") == "object":
            values = option.get("additionalProperties")
            parts.append(f"object of {type_of(values, defs)}" if isinstance(values, dict) else "object")
        else:
            text = {"integer": "integer", "number": "number", "string": "string", "boolean": "true/false"}.get(
                option.get("type", ""), option.get("type", "any"))
            bounds = [f"{symbol} {option[key]}" for key, symbol in (
                ("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"))
                if key in option]
            parts.append(" ".join([text, *bounds]) if len(bounds) < 2 else f"{text} in [{option.get('minimum')}, "
                                                                             f"{option.get('maximum')}]")
    return " or ".join(dict.fromkeys(parts)) or "any"


def _sections(schema: dict[str, Any], defs: dict[str, Any], path: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """(dotted path, [(key, type)]) for the object at ``path`` and, after it, each object below it."""
    rows: list[tuple[str, str]] = []
    nested: list[tuple[str, list[tuple[str, str]]]] = []
    for key, field in schema.get("properties", {}).items():
        rows.append((key, type_of(field, defs)))
        for option in _without_null(field):
            option = _resolve(option, defs)
            if option.get("type") == "object" and "properties" in option:
                nested += _sections(option, defs, f"{path}.{key}" if path else key)
    return [(path, rows), *nested]


def paths() -> list[str]:
    """Every key the schema knows, dotted."""
    schema = ExecutionInput.model_json_schema(by_alias=True)
    return [f"{path}.{key}" if path else key
            for path, rows in _sections(schema, schema.get("$defs", {}), "") for key, _ in rows]


def render() -> str:
    schema = ExecutionInput.model_json_schema(by_alias=True)
    defs = schema.get("$defs", {})
    lines = [
        "# Execution input",
        "",
        "<!-- Generated by `python -m lambdas.execution_input.docs` from lambdas/execution_input/schema.py; "
        "do not edit by hand. -->",
        "",
        "The pipeline's execution input (`invmon pipeline start --input FILE`, or StartExecution's `input`) is a JSON",
        "object of up to three sections. `{}` runs everything with the stack's defaults (cdk.json). The pipeline's",
        "first state, *Check input*, checks the whole input before anything runs, and only the checked,",
        "normalized input travels on through the states:",
        "",
        "- every key is optional, and **an unknown key at any level is refused** with the nearest known key as a",
        "  did-you-mean (`datset` -> `dataset`, `forse` -> `force`);",
        "- **types are strict**: `\"3\"` is not an integer, `true` is not a count, `1` is not `true`;",
        f"- the input may hold at most **{MAX_INPUT_BYTES:,} bytes** of JSON, so the state data has room within",
        f"  Step Functions' {STATE_PAYLOAD_LIMIT_BYTES:,}-byte limit per state (exceeding it mid-pipeline would be",
        "  `States.DataLimitExceeded`, which a `States.ALL` catcher does not catch);",
        "- each stage's cross-field rules are checked at the door too (the selector's own fields, the splits'",
        "  fractions, spot waits, the trainer's argument parser, tuning ranges);",
        "- a refusal fails the execution in that first state, error `InvalidExecutionInput`, with a cause that",
        "  names the field and stays under 1,000 characters (long values are described, never echoed).",
        "",
        "## What the stack must allow",
        "",
        "Some values switch a control off or spend more than the stack permits. They are refused unless the",
        "stack's context allows them (`cdk deploy -c key=value`); the refusal names the key.",
        "",
        "| Context key | Governs |",
        "| --- | --- |",
        *(f"| `{key}` | {governs} |" for key, governs in ALLOWANCES),
        "",
    ]
    for path, rows in _sections(schema, defs, ""):
        title = f"`{path}`" if path else "Top level"
        lines += [f"## {title}", ""]
        if path:
            lines += [MEANINGS.get(path, ""), ""]
        lines += ["| Key | Type | Meaning |", "| --- | --- | --- |"]
        for key, kind in rows:
            dotted = f"{path}.{key}" if path else key
            lines.append(f"| `{key}` | {kind} | {MEANINGS.get(dotted, '')} |")
        lines.append("")
    lines += [
        "## Example",
        "",
        "```json",
        json.dumps({"dataset": {"selector": "count-range", "minCount": 1, "maxCount": 3, "limit": 2000},
                    "training": {"instanceType": "ml.g5.xlarge", "epochs": 8},
                    "deploy": {"minImprovement": 0.01}}, indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    DOCUMENT.parent.mkdir(exist_ok=True)
    DOCUMENT.write_text(render())
    print(f"wrote {DOCUMENT}", file=sys.stderr)


if __name__ == "__main__":
    main()
