"""The review stage in the synthesized template: sign-in, API, page, queue index, alarm (cdk-nag and cfn-lint
run on the whole app in test_nag.py and test_synth.py)."""

from __future__ import annotations

from aws_cdk.assertions import Match, Template

from infra.config import load_settings


def _resources(template: Template, kind: str) -> dict:
    return template.find_resources(kind)


def test_the_counts_table_has_a_sparse_review_queue_index_matching_the_offline_one(template: Template):
    from invmon import review

    (table,) = [t for t in _resources(template, "AWS::DynamoDB::Table").values()
                if any(i["IndexName"] == "byStatus" for i in t["Properties"].get("GlobalSecondaryIndexes", []))]
    indexes = {i["IndexName"]: i["KeySchema"] for i in table["Properties"]["GlobalSecondaryIndexes"]}
    assert indexes["reviewQueue"] == [{"AttributeName": "reviewQueue", "KeyType": "HASH"},
                                      {"AttributeName": "reviewRank", "KeyType": "RANGE"}]
    # invmon/review.py builds the same keys for the offline backend (tests, browser test, review serve).
    import inspect

    source = inspect.getsource(review.create_counts_table)
    assert '("reviewQueue", "reviewQueue", "reviewRank")' in source and '("byStatus", "status", "countedAt")' in source


def test_the_user_pool_has_no_self_sign_up_a_reviewers_group_and_a_code_pkce_client(template: Template):
    template.has_resource_properties("AWS::Cognito::UserPool", {
        "AdminCreateUserConfig": {"AllowAdminCreateUserOnly": True}, "MfaConfiguration": "ON"})
    template.has_resource_properties("AWS::Cognito::UserPoolGroup", {"GroupName": "reviewers"})
    template.has_resource_properties("AWS::Cognito::UserPoolClient", {
        "AllowedOAuthFlows": ["code"], "AllowedOAuthFlowsUserPoolClient": True, "GenerateSecret": False,
        "SupportedIdentityProviders": Match.any_value()})
    template.resource_count_is("AWS::Cognito::UserPoolDomain", 1)


def test_every_review_route_has_the_jwt_authorizer_and_the_stage_is_throttled(template: Template):
    settings = load_settings()
    (authorizer_id,) = _resources(template, "AWS::ApiGatewayV2::Authorizer")
    authorizer = _resources(template, "AWS::ApiGatewayV2::Authorizer")[authorizer_id]["Properties"]
    assert authorizer["AuthorizerType"] == "JWT"
    routes = _resources(template, "AWS::ApiGatewayV2::Route")
    assert {r["Properties"]["RouteKey"] for r in routes.values()} == {
        "POST /claim", "GET /items/{item}/photo", "POST /items/{item}/answer", "POST /items/{item}/skip",
        "GET /stats"}
    for route in routes.values():
        assert route["Properties"]["AuthorizationType"] == "JWT"
        assert route["Properties"]["AuthorizerId"] == {"Ref": authorizer_id}
    template.has_resource_properties("AWS::ApiGatewayV2::Stage", {
        "DefaultRouteSettings": {"ThrottlingRateLimit": settings.review_api_rate_limit,
                                 "ThrottlingBurstLimit": settings.review_api_burst_limit},
        "AccessLogSettings": Match.object_like({"DestinationArn": Match.any_value()})})


def test_the_page_is_a_private_bucket_behind_cloudfront_with_origin_access_control(template: Template):
    template.resource_count_is("AWS::CloudFront::OriginAccessControl", 1)
    template.has_resource_properties("AWS::CloudFront::Distribution", {"DistributionConfig": Match.object_like({
        "DefaultRootObject": "index.html",
        "Origins": [Match.object_like({"OriginAccessControlId": Match.any_value()})]})})


def test_the_oldest_pending_review_has_an_alarm(template: Template):
    settings = load_settings()
    template.has_resource_properties("AWS::CloudWatch::Alarm", {
        "MetricName": "OldestPendingReviewSeconds",
        "Threshold": settings.review_oldest_pending_alarm_hours * 3600})
