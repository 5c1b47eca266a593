"""SageMaker's own limits on a training request, checked before any job starts (prepare) and at synth (config).

botocore's SageMaker service model is the machine-readable form of the API reference: the training instance types
(the ``TrainingInstanceType`` enum) and the ``HyperParameters`` map's limits. The SageMaker API reference says
"You can specify a maximum of 100 hyperparameters" (CreateTrainingJob, HyperParameters) and gives its
hyperparameter maps "Map Entries: ... Maximum number of 100 items. Key Length Constraints: Maximum length of 256.
... Value Length Constraints: Maximum length of 2500." (e.g. API_HyperParameterTrainingJobSummary.html); a
CategoricalParameterRange takes at most 30 values.

The answers are generated into ``limits.json`` (committed; a test regenerates it and compares) rather than read
from botocore at run time: the Lambda runtime's botocore is whatever version AWS ships, and synth and the prepare
step must agree on one list. Regenerate after upgrading boto3::

    .venv/bin/python -m lambdas.training.limits
"""

from __future__ import annotations

import difflib
import json
import sys
from functools import cache
from pathlib import Path
from typing import Any

LIMITS_JSON = Path(__file__).with_name("limits.json")


def generate() -> dict[str, Any]:
    import botocore
    import botocore.session

    model = botocore.session.get_session().get_service_model("sagemaker")
    hyperparameters = model.operation_model("CreateTrainingJob").input_shape.members["HyperParameters"]
    categorical = model.shape_for("CategoricalParameterRange").members["Values"]
    return {
        "generatedBy": f"botocore {botocore.__version__} SageMaker service model: python -m lambdas.training.limits",
        "trainingInstanceTypes": sorted(model.shape_for("TrainingInstanceType").enum),
        "hyperParameters": {
            "maxEntries": hyperparameters.metadata["max"],
            "maxKeyLength": hyperparameters.key.metadata["max"],
            "maxValueLength": hyperparameters.value.metadata["max"],
        },
        "maxCategoricalValues": categorical.metadata["max"],
    }


@cache
def limits() -> dict[str, Any]:
    return json.loads(LIMITS_JSON.read_text())


def check_training_instance_type(instance_type: str) -> None:
    """Refuse a type that SageMaker training does not offer (``ml.zzz.xlarge``, ``ml.g4dn.999xlarge``)."""
    offered = limits()["trainingInstanceTypes"]
    if instance_type not in offered:
        close = difflib.get_close_matches(instance_type, offered, n=3)
        hint = f"did you mean {' or '.join(close)}?" if close else "such as ml.g4dn.xlarge or ml.c5.xlarge"
        raise ValueError(f"{instance_type} is not an instance type SageMaker training offers; {hint}")


def main() -> None:
    document = generate()
    LIMITS_JSON.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    print(f"wrote {LIMITS_JSON} ({len(document['trainingInstanceTypes'])} training instance types)", file=sys.stderr)


if __name__ == "__main__":
    main()
