"""Container images by region: the PyTorch training and inference images and the Debugger rule image.

The SageMaker Python SDK knows which account serves each image in each region, but it is a heavy package
that has no place in a Lambda zip and should not be needed to synthesize. So the SDK's answers are
generated once into ``infra/images.json`` (committed; a test regenerates it and compares) and the stack
turns that file into a ``CfnMapping``: CloudFormation picks the entry for the region it deploys to.

Regenerate after changing frameworkVersion/pythonVersion or upgrading the SDK::

    .venv/bin/python -m infra.images
"""

from __future__ import annotations

import json
import sys
from functools import cache
from pathlib import Path
from typing import Any, Literal

from aws_cdk import Aws, CfnMapping, Stack
from constructs import Construct

from infra.config import load_settings
from lambdas.training.request import processor

IMAGES_JSON = Path(__file__).with_name("images.json")
# Written into the mapping where a region has no such image: CloudFormation mappings take no empty values.
UNAVAILABLE = "none"

Scope = Literal["training", "inference"]
Processor = Literal["cpu", "gpu"]
# Representative instance types: the SDK only needs the family to choose between the CPU and GPU image.
_PROBE_INSTANCE = {"cpu": "ml.c5.xlarge", "gpu": "ml.g4dn.xlarge"}


class ImageNotFound(LookupError):
    """No image for that framework version, region or scope in images.json; the message says how to fix it."""


def _key(framework_version: str, python_version: str) -> str:
    return f"{framework_version}/{python_version}"


def generate(framework_version: str, python_version: str) -> dict[str, Any]:
    """Ask the SageMaker SDK (v2, offline) for every region's images. Needs the ``dev`` extra."""
    import os

    os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
    import sagemaker
    from sagemaker import image_uris, utils

    # The SDK re-reads botocore's endpoint table on every lookup (0.1 s each, ~200 lookups); it never changes
    # within a run, so read it once.
    utils._botocore_resolver = cache(utils._botocore_resolver)

    def retrieve(framework: str, region: str, **kwargs: Any) -> str | None:
        try:
            return image_uris.retrieve(framework, region, **kwargs)
        except ValueError:
            return None

    config = image_uris.config_for_framework("pytorch")
    version = config["training"].get("version_aliases", {}).get(framework_version, framework_version)
    regions = sorted(config["training"]["versions"][version]["registries"])
    pytorch: dict[str, dict[str, dict[str, str]]] = {}
    for scope in ("training", "inference"):
        for proc, instance_type in _PROBE_INSTANCE.items():
            found = {
                region: uri
                for region in regions
                if (uri := retrieve("pytorch", region, version=framework_version, py_version=python_version,
                                    instance_type=instance_type, image_scope=scope))
            }
            pytorch.setdefault(scope, {})[proc] = found
    debugger = {region: uri for region in regions if (uri := retrieve("debugger", region))}
    return {
        "generatedBy": f"sagemaker {sagemaker.__version__} image_uris.retrieve; run python -m infra.images",
        "pytorch": {_key(framework_version, python_version): pytorch},
        "debugger": debugger,
    }


@cache
def _document() -> dict[str, Any]:
    return json.loads(IMAGES_JSON.read_text())


def _pytorch(framework_version: str, python_version: str) -> dict[str, dict[str, dict[str, str]]]:
    table = _document()["pytorch"].get(_key(framework_version, python_version))
    if table is None:
        raise ImageNotFound(
            f"infra/images.json has no PyTorch {framework_version} ({python_version}) images; "
            "run `.venv/bin/python -m infra.images` after changing frameworkVersion or pythonVersion"
        )
    return table


def image_uri(
    region: str,
    scope: Scope,
    instance_type: str,
    *,
    framework_version: str | None = None,
    python_version: str | None = None,
) -> str:
    """The PyTorch image for ``scope`` on ``instance_type`` in ``region`` (framework/Python versions default
    to cdk.json's)."""
    if framework_version is None or python_version is None:
        defaults = load_settings()
        framework_version = framework_version or defaults.framework_version
        python_version = python_version or defaults.python_version
    by_region = _pytorch(framework_version, python_version)[scope][processor(instance_type)]
    if region not in by_region:
        raise ImageNotFound(f"no PyTorch {scope} image for {instance_type} in {region}")
    return by_region[region]


def debugger_image_uri(region: str) -> str | None:
    """The Debugger rule evaluator image, or None where the region has none."""
    return _document()["debugger"].get(region)


def _mapping(scope: Construct, framework_version: str, python_version: str) -> CfnMapping:
    stack = Stack.of(scope)
    mapping_id = f"ContainerImages{framework_version.replace('.', '')}{python_version}"
    existing = stack.node.try_find_child(mapping_id)
    if existing is not None:
        return existing  # type: ignore[return-value]
    table = _pytorch(framework_version, python_version)
    debugger = _document()["debugger"]
    regions = sorted(table["training"]["gpu"])
    columns = {
        "TrainingGpu": table["training"]["gpu"],
        "TrainingCpu": table["training"]["cpu"],
        "InferenceGpu": table["inference"]["gpu"],
        "InferenceCpu": table["inference"]["cpu"],
        "Debugger": debugger,
    }
    return CfnMapping(
        stack,
        mapping_id,
        mapping={
            region: {column: values.get(region, UNAVAILABLE) for column, values in columns.items()}
            for region in regions
        },
        lazy=True,
    )


def image_for_stack_region(
    scope: Construct, image_scope: Scope, proc: Processor, *, framework_version: str, python_version: str
) -> str:
    """A CloudFormation value that resolves to the image of the region the stack deploys to."""
    column = f"{image_scope.capitalize()}{proc.capitalize()}"
    return _mapping(scope, framework_version, python_version).find_in_map(Aws.REGION, column)


def debugger_image_for_stack_region(scope: Construct, *, framework_version: str, python_version: str) -> str:
    """The Debugger rule image for the stack's region, or the string ``none`` where the region has none."""
    return _mapping(scope, framework_version, python_version).find_in_map(Aws.REGION, "Debugger")


def main() -> None:
    settings = load_settings()
    document = generate(settings.framework_version, settings.python_version)
    IMAGES_JSON.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    regions = document["pytorch"][_key(settings.framework_version, settings.python_version)]["training"]["gpu"]
    print(f"wrote {IMAGES_JSON} ({len(regions)} regions)", file=sys.stderr)


if __name__ == "__main__":
    main()
