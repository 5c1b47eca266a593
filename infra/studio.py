"""An optional SageMaker Studio domain (``-c studioDomain=true``): notebooks on the same data and reports.

One domain with IAM authentication and one user profile. The profile's execution role is the notebook's
identity; it may read the data bucket's prefixes (dataset, manifests, models, reports), start and follow the
pipeline, read the counts table and assume the cost-analysis role, plus what Studio itself needs to run the
user's apps inside this domain. Nothing wider: no writes to the bucket, no training jobs of its own.

A domain needs a VPC and subnets even with public internet access (its home directories live on an EFS file
system with mount targets there). The stack has no VPC of its own (training uses ``trainingSubnetIds`` where
given), so this construct makes a minimal one: two isolated subnets, no NAT gateway. ``studioNetworkAccess``:

- ``ByStage`` (default): ``VpcOnly`` in prod, ``PublicInternetOnly`` in any other stage.
- ``PublicInternetOnly``: the apps reach the internet and AWS APIs through SageMaker's own network;
  the VPC only hosts the EFS mount targets. Cheapest, and ``pip install`` works in a notebook.
- ``VpcOnly``: all app traffic stays in this VPC. With no NAT gateway, the apps reach only the AWS services
  given an endpoint here (S3 and DynamoDB gateways; SageMaker API and runtime, STS, Step Functions, CloudWatch
  Logs as interface endpoints, billed per hour and AZ); no internet, so no ``pip install`` from PyPI. Add a
  NAT gateway (about the price of several endpoints, plus data) if notebooks need the internet.
"""

from __future__ import annotations

from aws_cdk import ArnFormat, Aws, RemovalPolicy, Stack
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sagemaker as sagemaker
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from infra.config import Settings
from infra.function import log_group
from infra.nag import suppress, wildcard_suppression
from infra.storage import MANIFEST_PREFIX, MODEL_PREFIX, RAW_PREFIX, REPORT_PREFIX

USER_PROFILE = "analyst"
# What a notebook may read from the data bucket: the dataset, the channels, the models and every report.
READABLE_PREFIXES = (RAW_PREFIX, MANIFEST_PREFIX, MODEL_PREFIX, REPORT_PREFIX)
# Interface endpoints a VpcOnly domain needs for the calls its user role may make, plus Studio's own.
VPC_ONLY_ENDPOINTS = {
    "SageMakerApi": ec2.InterfaceVpcEndpointAwsService.SAGEMAKER_API,
    "SageMakerRuntime": ec2.InterfaceVpcEndpointAwsService.SAGEMAKER_RUNTIME,
    "Sts": ec2.InterfaceVpcEndpointAwsService.STS,
    "StepFunctions": ec2.InterfaceVpcEndpointAwsService.STEP_FUNCTIONS,
    "Logs": ec2.InterfaceVpcEndpointAwsService.CLOUDWATCH_LOGS,
}
# What Studio does with the execution role to open the user's apps (JupyterLab, code editor) and spaces.
STUDIO_APP_ACTIONS = [
    "sagemaker:DeleteApp", "sagemaker:DescribeApp", "sagemaker:ListApps",
    "sagemaker:CreateSpace", "sagemaker:UpdateSpace", "sagemaker:DeleteSpace", "sagemaker:DescribeSpace",
    "sagemaker:ListSpaces", "sagemaker:DescribeDomain", "sagemaker:DescribeUserProfile",
    "sagemaker:ListTags", "sagemaker:AddTags",
]


def network_access(settings: Settings) -> str:
    """The domain's AppNetworkAccessType: production notebooks keep their traffic in the VPC unless told otherwise."""
    if settings.studio_network_access == "ByStage":
        return "VpcOnly" if settings.is_production else "PublicInternetOnly"
    return settings.studio_network_access


# What Studio apps may run on (CreateApp's sagemaker:InstanceTypes): Studio's own "system" apps and the small
# general-purpose types a notebook on these reports needs; training belongs to the pipeline.
STUDIO_INSTANCE_TYPES = ["system", "ml.t3.*", "ml.m5.large", "ml.m5.xlarge", "ml.c5.large", "ml.c5.xlarge"]


class Studio(Construct):
    """The domain (``.domain``), its user profile (``.user``) and the profile's execution role (``.role``)."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: Settings,
        data_bucket: s3.IBucket,
        data_key: kms.IKey,
        counts_table: dynamodb.ITable,
        state_machine: sfn.StateMachine,
        cost_analysis_role: iam.Role,
    ) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        access = network_access(settings)
        vpc_only = access == "VpcOnly"
        removal = RemovalPolicy.RETAIN if settings.is_production else RemovalPolicy.DESTROY

        self.vpc = ec2.Vpc(
            self, "Vpc", max_azs=2, nat_gateways=0,
            subnet_configuration=[ec2.SubnetConfiguration(name="studio", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED,
                                                          cidr_mask=24)],
        )
        flow_logs = log_group(self, settings, "FlowLogs")
        self.vpc.add_flow_log("FlowLog", destination=ec2.FlowLogDestination.to_cloud_watch_logs(flow_logs))
        self.security_group = ec2.SecurityGroup(
            self, "Apps", vpc=self.vpc, allow_all_outbound=False,
            description=f"{settings.project} Studio apps: to each other (NFS to the home directories) and HTTPS",
        )
        self.security_group.add_ingress_rule(self.security_group, ec2.Port.all_traffic(),
                                             "Studio apps and their EFS home directories")
        self.security_group.add_egress_rule(self.security_group, ec2.Port.all_traffic(),
                                            "Studio apps and their EFS home directories")
        if vpc_only:
            # The gateway endpoints reach this stack's data bucket and counts table only, so a notebook cannot copy
            # data to any other bucket or table through them (the security group's 443 egress goes nowhere else:
            # there is no NAT or internet gateway).
            s3_gateway = self.vpc.add_gateway_endpoint("S3", service=ec2.GatewayVpcEndpointAwsService.S3)
            s3_gateway.add_to_policy(iam.PolicyStatement(
                sid="ThisStacksDataBucketOnly", principals=[iam.AnyPrincipal()],
                actions=["s3:GetObject", "s3:GetObjectVersion", "s3:ListBucket"],
                resources=[data_bucket.bucket_arn, data_bucket.arn_for_objects("*")],
            ))
            dynamodb_gateway = self.vpc.add_gateway_endpoint("DynamoDb",
                                                             service=ec2.GatewayVpcEndpointAwsService.DYNAMODB)
            dynamodb_gateway.add_to_policy(iam.PolicyStatement(
                sid="ThisStacksCountsTableOnly", principals=[iam.AnyPrincipal()],
                actions=["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:Query", "dynamodb:Scan",
                         "dynamodb:DescribeTable"],
                resources=[counts_table.table_arn, f"{counts_table.table_arn}/index/*"],
            ))
            # HTTPS to the endpoints: the interface ones (in this security group, so reachable by the rule above)
            # and the gateway ones, whose addresses are AWS prefix lists outside the VPC. With no NAT gateway and
            # no internet gateway nothing else is reachable on 443.
            self.security_group.add_egress_rule(ec2.Peer.any_ipv4(), ec2.Port.tcp(443),
                                                "AWS service endpoints (interface and S3/DynamoDB gateway)")
            for name, service in VPC_ONLY_ENDPOINTS.items():
                # open=False: reached through the security group's own rule, not from the whole VPC.
                self.vpc.add_interface_endpoint(name, service=service, private_dns_enabled=True, open=False,
                                                security_groups=[self.security_group])

        self.key = kms.Key(self, "Key", enable_key_rotation=True, removal_policy=removal,
                           description=f"{settings.project}: encrypts the Studio domain's home directories (EFS)")
        self.role = self._user_role(settings, data_bucket, data_key, counts_table, state_machine, cost_analysis_role)
        self.domain = sagemaker.CfnDomain(
            self, "Domain",
            domain_name=f"{settings.project}-{settings.stage}",
            auth_mode="IAM",
            app_network_access_type=access,
            vpc_id=self.vpc.vpc_id,
            subnet_ids=[subnet.subnet_id for subnet in self.vpc.isolated_subnets],
            kms_key_id=self.key.key_arn,
            default_user_settings=sagemaker.CfnDomain.UserSettingsProperty(
                execution_role=self.role.role_arn,
                security_groups=[self.security_group.security_group_id],
            ),
            default_space_settings=sagemaker.CfnDomain.DefaultSpaceSettingsProperty(
                execution_role=self.role.role_arn,
                security_groups=[self.security_group.security_group_id],
            ),
        )
        self.user = sagemaker.CfnUserProfile(
            self, "User",
            domain_id=self.domain.attr_domain_id,
            user_profile_name=USER_PROFILE,
            user_settings=sagemaker.CfnUserProfile.UserSettingsProperty(execution_role=self.role.role_arn),
        )
        self._grant_studio_apps(stack)

    def _user_role(self, settings: Settings, bucket: s3.IBucket, key: kms.IKey, table: dynamodb.ITable,
                   state_machine: sfn.StateMachine, cost_analysis_role: iam.Role) -> iam.Role:
        role = iam.Role(
            self, "UserRole",
            assumed_by=iam.ServicePrincipal("sagemaker.amazonaws.com"),
            description=f"{settings.project}: Studio user ({USER_PROFILE}); reads data and reports, follows "
                        f"{'and starts ' if settings.studio_can_start_pipeline else ''}the pipeline, reads counts, "
                        "may assume the cost-analysis role",
        )
        objects = [bucket.arn_for_objects(f"{prefix}*") for prefix in READABLE_PREFIXES]
        role.add_to_policy(iam.PolicyStatement(sid="ReadDataAndReports", actions=["s3:GetObject"],
                                               resources=objects))
        role.add_to_policy(iam.PolicyStatement(
            sid="ListReadablePrefixes", actions=["s3:ListBucket"], resources=[bucket.bucket_arn],
            conditions={"StringLike": {"s3:prefix": [f"{prefix}*" for prefix in READABLE_PREFIXES]}},
        ))
        key.grant_decrypt(role)
        table.grant_read_data(role)
        executions = Stack.of(self).format_arn(
            service="states", resource="execution", resource_name=f"{state_machine.state_machine_name}:*",
            arn_format=ArnFormat.COLON_RESOURCE_NAME,
        )
        role.add_to_policy(iam.PolicyStatement(
            sid="ListPipelineExecutions", actions=["states:ListExecutions"],
            resources=[state_machine.state_machine_arn],
        ))
        if settings.studio_can_start_pipeline:
            # Starting the pipeline trains and deploys on the stack's account: off unless the stack grants it.
            role.add_to_policy(iam.PolicyStatement(
                sid="StartThePipeline", actions=["states:StartExecution"],
                resources=[state_machine.state_machine_arn],
            ))
        role.add_to_policy(iam.PolicyStatement(
            sid="FollowPipelineExecutions", actions=["states:DescribeExecution", "states:GetExecutionHistory"],
            resources=[executions],
        ))
        cost_analysis_role.grant_assume_role(role)
        cost_analysis_role.assume_role_policy.add_statements(iam.PolicyStatement(
            actions=["sts:AssumeRole"], principals=[iam.ArnPrincipal(role.role_arn)],
        ))
        self._executions = executions
        self._table_arn = table.table_arn
        self._objects = objects
        return role

    def _grant_studio_apps(self, stack: Stack) -> None:
        domain = self.domain.attr_domain_id
        in_domain = [stack.format_arn(service="sagemaker", resource=kind, resource_name=f"{domain}/*")
                     for kind in ("app", "space", "user-profile")]
        domain_arn = stack.format_arn(service="sagemaker", resource="domain", resource_name=domain)
        self.role.add_to_policy(iam.PolicyStatement(sid="RunStudioAppsInThisDomain", actions=STUDIO_APP_ACTIONS,
                                                    resources=[*in_domain, domain_arn]))
        # The instance-type condition key of CreateApp ("Limit access to SageMaker AI resources by instance type",
        # SageMaker AI identity-based policy examples): a notebook cannot start a GPU app on this role.
        self.role.add_to_policy(iam.PolicyStatement(
            sid="CreateSmallStudioAppsInThisDomain", actions=["sagemaker:CreateApp"], resources=in_domain[:1],
            conditions={"ForAllValues:StringLike": {"sagemaker:InstanceTypes": STUDIO_INSTANCE_TYPES}},
        ))
        studio_logs = f"arn:{Aws.PARTITION}:logs:{Aws.REGION}:{Aws.ACCOUNT_ID}:log-group:/aws/sagemaker/studio:*"
        self.role.add_to_policy(iam.PolicyStatement(
            sid="StudioAppLogs", actions=["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
            resources=[studio_logs],
        ))
        suppress(
            self.role,
            wildcard_suppression(
                self.role, "Read-only object access per prefix of the data bucket (raw/, manifests/, models/, "
                "reports/): datasets, models and reports are many objects, never the whole bucket.",
                resources=self._objects,
            ),
            wildcard_suppression(
                self.role, "DescribeExecution/GetExecutionHistory on the executions of the one pipeline state "
                "machine (':*' is its execution names), and Studio's apps, spaces and profiles of this one domain.",
                resources=[self._executions, *in_domain],
            ),
            wildcard_suppression(
                self.role, "Studio apps write their logs to one stream per app in the /aws/sagemaker/studio log "
                "group; ':*' is its streams.", resources=[studio_logs],
            ),
            wildcard_suppression(
                self.role, "CDK's read grant on the counts table covers its global secondary indexes ('/index/*': "
                "the table's own indexes, read-only).", resources=[f"{self._table_arn}/index/*"],
            ),
        )

