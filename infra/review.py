"""The review loop: reviewers' sign-in (Cognito), the review API (HTTP API + Lambda) and the review page
(private bucket + CloudFront with origin access control).

AWS's managed human-review services are closed to new customers (Amazon Augmented AI and SageMaker Ground Truth
are "no longer open to new customers", their documentation says), so the loop is built from the serverless
parts the stack already uses. The queue itself is the counts table's sparse ``reviewQueue`` index
(infra/count.py, lambdas/review/queue.py).

After ``cdk deploy`` an administrator adds each reviewer once (README, "Review"): the pool allows no self
sign-up.
"""

from __future__ import annotations

import json

from aws_cdk import CfnOutput, Duration, RemovalPolicy, Stack, Tags, Token
from aws_cdk import aws_apigatewayv2 as apigw
from aws_cdk import aws_apigatewayv2_authorizers as authorizers
from aws_cdk import aws_apigatewayv2_integrations as integrations
from aws_cdk import aws_cloudfront as cloudfront
from aws_cdk import aws_cloudfront_origins as origins
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cognito as cognito
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_s3_deployment as s3deploy
from cdk_nag import NagPackSuppression, NagSuppressions
from constructs import Construct

from infra.config import Settings
from infra.function import PROJECT_ROOT, PythonFunction, log_group
from infra.nag import IAM4, IAM5, flatten, resource_finding, suppress, wildcard_suppression
from infra.storage import grant_read_prefix

WEB_DIR = PROJECT_ROOT / "web" / "review"
REVIEWERS_GROUP = "reviewers"
# How often the queue's gauges (pending, oldest pending age) are measured for the dashboard and its alarm.
GAUGE_MINUTES = 5


def _bootstrap_assets_finding(stack: Stack) -> str:
    """The IAM5 finding for the BucketDeployment's read of the page's zip in CDK's bootstrap assets bucket
    (default qualifier), named with the stack's account and region where they are known, as CDK names it."""
    account = "<AWS::AccountId>" if Token.is_unresolved(stack.account) else stack.account
    region = "<AWS::Region>" if Token.is_unresolved(stack.region) else stack.region
    return f"Resource::arn:<AWS::Partition>:s3:::cdk-hnb659fds-assets-{account}-{region}/*"


class Review(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, settings: Settings, data_bucket: s3.IBucket,
                 data_key: kms.IKey, counts_table: dynamodb.ITable) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        removal = RemovalPolicy.RETAIN if settings.is_production else RemovalPolicy.DESTROY

        # --- the page: private bucket, CloudFront with origin access control -------------------------------
        self.site = s3.Bucket(
            self, "Site", encryption=s3.BucketEncryption.S3_MANAGED, enforce_ssl=True, versioned=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL, removal_policy=removal,
            auto_delete_objects=not settings.is_production,
        )
        self.distribution = cloudfront.Distribution(
            self, "Distribution",
            comment=f"{settings.project} review page",
            default_root_object="index.html",
            default_behavior=cloudfront.BehaviorOptions(
                origin=origins.S3BucketOrigin.with_origin_access_control(self.site),
                viewer_protocol_policy=cloudfront.ViewerProtocolPolicy.REDIRECT_TO_HTTPS,
                cache_policy=cloudfront.CachePolicy.CACHING_DISABLED,
                response_headers_policy=cloudfront.ResponseHeadersPolicy.SECURITY_HEADERS,
            ),
        )
        page_url = f"https://{self.distribution.distribution_domain_name}/"

        # --- sign-in: a user pool with no self sign-up, managed login, code + PKCE ----------------------------
        self.user_pool = cognito.UserPool(
            self, "Reviewers",
            self_sign_up_enabled=False,
            sign_in_aliases=cognito.SignInAliases(email=True),
            account_recovery=cognito.AccountRecovery.EMAIL_ONLY,
            password_policy=cognito.PasswordPolicy(min_length=12, require_digits=True, require_lowercase=True,
                                                   require_uppercase=True, require_symbols=True),
            mfa=cognito.Mfa.REQUIRED,
            mfa_second_factor=cognito.MfaSecondFactor(otp=True, sms=False),
            feature_plan=cognito.FeaturePlan.ESSENTIALS,
            removal_policy=removal,
        )
        self.domain = self.user_pool.add_domain(
            "Login",
            # At most 63 characters: a project name of up to 31, the stage, "-review-" and the 12-digit account.
            cognito_domain=cognito.CognitoDomainOptions(
                domain_prefix=f"{settings.project}-{settings.stage}-review-{stack.account}"),
            managed_login_version=cognito.ManagedLoginVersion.NEWER_MANAGED_LOGIN,
        )
        # A public client (no secret) with the authorization-code grant only: Cognito requires PKCE of a client
        # without a secret that uses the code grant from a browser.
        self.client = self.user_pool.add_client(
            "Page",
            generate_secret=False,
            auth_flows=cognito.AuthFlow(user_srp=False, user_password=False, admin_user_password=False,
                                        custom=False),
            o_auth=cognito.OAuthSettings(flows=cognito.OAuthFlows(authorization_code_grant=True),
                                         scopes=[cognito.OAuthScope.OPENID, cognito.OAuthScope.EMAIL],
                                         callback_urls=[page_url], logout_urls=[page_url]),
            access_token_validity=Duration.hours(1),
            id_token_validity=Duration.hours(1),
            refresh_token_validity=Duration.hours(12),
            prevent_user_existence_errors=True,
        )
        cognito.CfnManagedLoginBranding(self, "Branding", user_pool_id=self.user_pool.user_pool_id,
                                        client_id=self.client.user_pool_client_id, use_cognito_provided_values=True)
        cognito.CfnUserPoolGroup(self, "ReviewersGroup", user_pool_id=self.user_pool.user_pool_id,
                                 group_name=REVIEWERS_GROUP, description="May claim and answer review items")

        # --- the API --------------------------------------------------------------------------------------
        self.handler = PythonFunction(
            self, "Function", settings=settings, handler="lambdas.review.handler.handler", service="review",
            description="Review API: claim, photo, answer, skip, stats; and the queue's gauges",
            environment={"COUNTS_TABLE": counts_table.table_name, "DATA_BUCKET": data_bucket.bucket_name,
                         "REVIEW_LEASE_SECONDS": str(settings.review_lease_seconds)},
            timeout_seconds=29,  # an HTTP API integration times out after 30 s at most (API Gateway quotas)
            memory_size=256,
        )
        role = self.handler.role
        counts_table.grant_read_write_data(role)
        # Presigned GETs are signed with this role: it reads the uploads, and copies them to raw/reviewed/.
        grant_read_prefix(data_bucket, data_key, role, f"{settings.incoming_prefix}*")
        data_bucket.grant_put(role, "raw/reviewed/*")
        data_bucket.grant_delete(role, "raw/reviewed/*")
        data_key.grant_encrypt_decrypt(role)

        self.api = apigw.HttpApi(
            self, "Api",
            description=f"{settings.project} review API",
            cors_preflight=apigw.CorsPreflightOptions(
                allow_origins=[page_url.rstrip("/")],
                allow_methods=[apigw.CorsHttpMethod.GET, apigw.CorsHttpMethod.POST],
                allow_headers=["authorization", "content-type"], max_age=Duration.hours(1)),
            create_default_stage=False,
        )
        access_logs = log_group(self, settings, "AccessLogs")
        self.stage = apigw.HttpStage(
            self, "Stage", http_api=self.api, stage_name="$default", auto_deploy=True,
            # The stage's default route throttling: API Gateway answers 429 above it, before the Lambda runs.
            throttle=apigw.ThrottleSettings(rate_limit=settings.review_api_rate_limit,
                                            burst_limit=settings.review_api_burst_limit),
        )
        # Every request with its caller (the JWT's sub), status and latency.
        stage = self.stage.node.default_child
        stage.access_log_settings = apigw.CfnStage.AccessLogSettingsProperty(  # type: ignore[union-attr]
            destination_arn=access_logs.log_group_arn,
            format=json.dumps({"requestId": "$context.requestId", "ip": "$context.identity.sourceIp",
                               "sub": "$context.authorizer.claims.sub", "time": "$context.requestTime",
                               "method": "$context.httpMethod", "route": "$context.routeKey",
                               "status": "$context.status", "latencyMs": "$context.responseLatency",
                               "error": "$context.authorizer.error"}),
        )
        authorizer = authorizers.HttpJwtAuthorizer(
            "Jwt", jwt_issuer=f"https://cognito-idp.{stack.region}.amazonaws.com/{self.user_pool.user_pool_id}",
            # Cognito access tokens carry client_id, not aud: the authorizer checks client_id then ("Controlling
            # access to HTTP APIs with JWT authorizers", API Gateway developer guide).
            jwt_audience=[self.client.user_pool_client_id],
        )
        integration = integrations.HttpLambdaIntegration("Lambda", self.handler.function)
        for path, method in (("/claim", apigw.HttpMethod.POST), ("/items/{item}/photo", apigw.HttpMethod.GET),
                             ("/items/{item}/answer", apigw.HttpMethod.POST),
                             ("/items/{item}/skip", apigw.HttpMethod.POST), ("/stats", apigw.HttpMethod.GET)):
            self.api.add_routes(path=path, methods=[method], integration=integration, authorizer=authorizer)
        self.api_url = self.api.api_endpoint

        # --- the page's files, with the config that points it at this stack -----------------------------------
        self.deployment = s3deploy.BucketDeployment(
            self, "Page",
            destination_bucket=self.site,
            sources=[s3deploy.Source.asset(str(WEB_DIR)),
                     s3deploy.Source.json_data("config.json", {
                         "apiUrl": self.api_url,
                         "authUrl": self.domain.base_url(),
                         "clientId": self.client.user_pool_client_id})],
            distribution=self.distribution,
            distribution_paths=["/*"],
            memory_limit=256,
        )

        # --- gauges: the queue's size and its oldest item, every few minutes -----------------------------------
        events.Rule(self, "Gauge", schedule=events.Schedule.rate(Duration.minutes(GAUGE_MINUTES)),
                    targets=[targets.LambdaFunction(self.handler.function)])
        namespace, service = settings.project, "review"
        dims = {"service": service}
        self.pending = cloudwatch.Metric(namespace=namespace, metric_name="ReviewsPending", dimensions_map=dims,
                                         statistic="Maximum", period=Duration.minutes(GAUGE_MINUTES))
        self.oldest = cloudwatch.Metric(namespace=namespace, metric_name="OldestPendingReviewSeconds",
                                        dimensions_map=dims, statistic="Maximum",
                                        period=Duration.minutes(GAUGE_MINUTES))
        self.answered = cloudwatch.Metric(namespace=namespace, metric_name="ReviewsAnswered", dimensions_map=dims,
                                          statistic="Sum", period=Duration.days(1))
        self.agreement = cloudwatch.Metric(namespace=namespace, metric_name="ReviewAgreement", dimensions_map=dims,
                                           statistic="Average", period=Duration.days(1))
        self.oldest_threshold = float(settings.review_oldest_pending_alarm_hours * 3600)
        self.oldest_alarm = cloudwatch.Alarm(
            self, "OldestPending", metric=self.oldest,
            threshold=self.oldest_threshold, evaluation_periods=1,
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            alarm_description=f"A photo has waited more than {settings.review_oldest_pending_alarm_hours} h "
                              "for a reviewer",
        )

        outputs = {
            "ReviewPageUrl": (page_url, "The review page (sign in with a reviewer's account)"),
            "ReviewApiUrl": (self.api_url, "The review API (JWT from the reviewers user pool)"),
            "ReviewUserPoolId": (self.user_pool.user_pool_id, "Add reviewers here (README: Review)"),
        }
        for name, (value, description) in outputs.items():
            CfnOutput(stack, name, value=value, description=description)
        self._suppressions(stack, settings, data_bucket, counts_table)

    def widgets(self) -> list[cloudwatch.IWidget]:
        return [
            cloudwatch.GraphWidget(title="Reviews pending", left=[self.pending], width=6),
            cloudwatch.GraphWidget(title="Oldest pending review (s)", left=[self.oldest], width=6,
                                   left_annotations=[cloudwatch.HorizontalAnnotation(
                                       value=self.oldest_threshold, label="alarm")]),
            cloudwatch.GraphWidget(title="Reviews per day", left=[self.answered], width=6),
            cloudwatch.GraphWidget(title="Agreement of model and reviewers (%)", left=[self.agreement], width=6),
        ]

    def _suppressions(self, stack: Stack, settings: Settings, data_bucket: s3.IBucket,
                      counts_table: dynamodb.ITable) -> None:
        suppress(
            self.handler.role,
            wildcard_suppression(
                self.handler, "The review function presigns GETs of uploads anywhere under the incoming prefix, "
                "writes and removes labels under raw/reviewed/, and queries the counts table's indexes "
                "(reviewQueue, byStatus).",
                resources=[data_bucket.arn_for_objects(f"{settings.incoming_prefix}*"),
                           data_bucket.arn_for_objects("raw/reviewed/*"), f"{counts_table.table_arn}/index/*"]),
            wildcard_suppression(
                self.handler, "CDK's bucket put/delete grants and the data key's encrypt/decrypt grant expand to "
                "these action families; the resources are the prefixes and key above.",
                actions=["s3:DeleteObject*", "s3:Abort*", "kms:GenerateDataKey*", "kms:ReEncrypt*"]),
        )
        NagSuppressions.add_resource_suppressions(self.user_pool, [
            NagPackSuppression(id="AwsSolutions-COG3", reason="Threat protection (advanced security) is a paid "
                               "feature plan; the pool has no self sign-up, MFA is required and only an "
                               "administrator adds reviewers."),
            NagPackSuppression(id="AwsSolutions-COG8", reason="The Plus feature plan (threat protection) is "
                               "priced per monthly active user on top of Essentials; a pool of a few invited "
                               "reviewers with required MFA and no self sign-up does not need it."),
        ], apply_to_children=True)
        NagSuppressions.add_resource_suppressions(self.site, [
            NagPackSuppression(id="AwsSolutions-S1", reason="The page's bucket holds three static files that "
                               "CloudFront serves; every change comes from cdk deploy, whose CloudTrail record "
                               "is the audit trail. Access logs would log only CloudFront's own reads."),
        ], apply_to_children=True)
        NagSuppressions.add_resource_suppressions(self.distribution, [
            NagPackSuppression(id="AwsSolutions-CFR1", reason="Reviewers may work from any country, so the page has "
                               "no geographic restriction; sign-in and the API decide who may review."),
            NagPackSuppression(id="AwsSolutions-CFR2", reason="The distribution serves three static files; every "
                               "request that reads or changes data goes to the API, which checks a JWT and is "
                               "throttled. A web ACL would cost more than the page."),
            NagPackSuppression(id="AwsSolutions-CFR3", reason="Static files only; the API's own access log records "
                               "every data request with its caller."),
            NagPackSuppression(id="AwsSolutions-CFR4", reason="The default *.cloudfront.net certificate: CloudFront "
                               "then allows TLSv1 for old clients, which only a custom domain and certificate "
                               "can change."),
        ])
        NagSuppressions.add_resource_suppressions(self.api, [
            NagPackSuppression(id="AwsSolutions-APIG4", reason="Every route has the JWT authorizer; only CORS "
                               "preflight (OPTIONS), which API Gateway answers itself, has none."),
        ], apply_to_children=True)
        # CDK's BucketDeployment brings its own singleton Lambda (and layer) that copies the page into the bucket.
        handler = next((c for c in stack.node.children if c.node.id.startswith("Custom::CDKBucketDeployment")), None)
        if handler is not None:
            Tags.of(handler).add("component", "review")
            basic_execution = f"arn:{stack.partition}:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole"
            NagSuppressions.add_resource_suppressions(handler, [
                NagPackSuppression(id="AwsSolutions-L1", reason="CDK chooses the runtime of its own "
                                   "BucketDeployment handler, which copies the page's files at deploy time only."),
                NagPackSuppression(id=IAM4, reason="CDK's BucketDeployment handler attaches "
                                   "AWSLambdaBasicExecutionRole for its own logs; CDK generates the function and role.",
                                   applies_to=[f"Policy::{flatten(stack.resolve(basic_execution))}"]),
                NagPackSuppression(id=IAM5, reason="CDK's BucketDeployment handler reads the page's asset zip from "
                                   "the bootstrap assets bucket, writes and prunes the page's bucket, and invalidates "
                                   "the distribution (CloudFront invalidation actions take no narrower resource).",
                                   applies_to=[
                                       *(f"Action::{a}" for a in ("s3:GetObject*", "s3:GetBucket*", "s3:List*",
                                                                  "s3:DeleteObject*", "s3:Abort*")),
                                       resource_finding(self, self.site.arn_for_objects("*")),
                                       "Resource::*",
                                       _bootstrap_assets_finding(stack),
                                   ]),
            ], apply_to_children=True)
