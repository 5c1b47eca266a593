"""``$.input.deploy``: what one execution may ask of the deploy gate, as the execution-input schema checks it at the
door (lambdas/execution_input/schema.py) and the gate reads it."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class DeployOptions(BaseModel):
    """Every field optional: absent means the deployment's own setting."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True,
                              strict=True)

    # Deploy whatever the metrics say; honoured only where the stack allows it (allowForceDeploy).
    force: bool | None = None
    # The validation accuracy the new model must gain over the one in service (deployMinImprovement).
    # strict: a JSON number (0 and 0.02 alike), never "a lot" or "0.02".
    min_improvement: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
