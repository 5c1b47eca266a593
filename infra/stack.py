"""The invmon stack: one stack composed of per-domain constructs, wired where the parts meet."""

from __future__ import annotations

from aws_cdk import CfnOutput, Stack, Tags
from constructs import Construct

from infra.config import Settings
from infra.storage import Storage


class InvmonStack(Stack):
    def __init__(self, scope: Construct, construct_id: str, *, settings: Settings, **kwargs) -> None:
        super().__init__(scope, construct_id, **kwargs)
        self.settings = settings
        Tags.of(self).add("project", settings.project)
        Tags.of(self).add("stage", settings.stage)

        self.storage = Storage(self, "Storage", settings=settings)
        Tags.of(self.storage).add("component", "storage")

        CfnOutput(self, "DataBucketName", value=self.storage.data.bucket_name,
                  description="Bucket holding the dataset, models, reports and incoming photos")
        CfnOutput(self, "IncomingPrefix", value=settings.incoming_prefix,
                  description="Upload photos under this prefix of the data bucket to have them counted")
