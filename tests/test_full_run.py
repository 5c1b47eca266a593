"""full-run.json, the execution input the README's "Full run" section starts, passes the checks the select and
prepare steps make on every execution, and asks for what the section prices."""

from __future__ import annotations

import json
from pathlib import Path

from lambdas.ingest import request as dataset_request
from lambdas.ingest import select
from lambdas.training import request as training_request

FULL_RUN = Path(__file__).resolve().parents[1] / "full-run.json"


def test_full_run_input_selects_the_whole_counting_split_and_trains_on_one_g5_spot_gpu():
    execution_input = json.loads(FULL_RUN.read_text())

    plan = dataset_request.resolve(dataset_request.parse_request(execution_input["dataset"]), run_id="full",
                                   environ={})
    assert (plan.selector, plan.challenge_split, plan.limit) == ("challenge", "all", None)
    assert len(set(select.challenge_ids("all"))) == 360_767

    training = training_request.parse_input(execution_input["training"])
    assert training.instance_type == "ml.g5.2xlarge" and training.use_spot is True
    # A type SageMaker training offers, on the GPU images: the prepare step's own check.
    assert training_request.check_instance_type(training.instance_type) == "gpu"
    assert training_request.has_local_storage(training.instance_type)  # NVMe: File-mode channels land there
