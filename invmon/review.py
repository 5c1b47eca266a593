"""The review loop offline: the review API's handlers behind a local HTTP server, sign-in through moto's Cognito.

``LocalReviewServer`` serves, on 127.0.0.1:

- ``/`` the review page (``web/review/``, the files CloudFront serves) and ``/config.json`` pointing it here;
- ``/api/...`` the review Lambda's handler (``lambdas.review.handler.handler``), called with the HTTP API
  (payload 2.0) event API Gateway would send, after checking the bearer token as the HTTP API JWT authorizer
  does ("Controlling access to HTTP APIs with JWT authorizers", API Gateway developer guide): an RS256
  signature by a key of the issuer's JWKS (moto's ``/<pool>/.well-known/jwks.json``), ``iss`` the user pool,
  ``exp`` and ``nbf``/``iat``, and the audience: ``aud``, or ``client_id`` when there is no ``aud`` (Cognito's
  access tokens carry ``client_id``), one of the app clients. Anything else is 401 before the handler runs;
- ``/oauth2/authorize``, ``/login`` and ``/oauth2/token``: the managed login's authorization-code flow with
  PKCE (S256), which moto does not implement. The password is checked, and the tokens issued, by moto's
  cognito-idp (``InitiateAuth``), so they are real JWTs signed by the pool's key.

``demo_step`` is the review stage of ``invmon demo``: a scripted reviewer signs in and answers every pending
photo with ABID's true count, over HTTP; ``stats`` is ``invmon review stats`` (audit precision with a Wilson
interval, wrong consignments caught per 100 reviews).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import http.server
import json
import math
import secrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import boto3

from invmon.local import LOOPBACK, free_port, patched_environ

ROOT = Path(__file__).resolve().parents[1]
WEB_DIR = ROOT / "web" / "review"
REGION = "us-east-1"
REVIEWERS_GROUP = "reviewers"
DEMO_REVIEWER = "demo-reviewer@example.com"
_CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css", ".js": "text/javascript",
                  ".json": "application/json", ".png": "image/png"}
# Clock skew the authorizer tolerates on exp/iat (API Gateway does not document one; none is allowed here).
LEEWAY_SECONDS = 0


class Unauthorized(Exception):
    pass


@dataclass
class Cognito:
    """A user pool in moto with an app client (code + PKCE, no secret) and the reviewers group."""

    moto_url: str
    pool_id: str
    client_id: str
    region: str = REGION

    @property
    def issuer(self) -> str:
        return f"https://cognito-idp.{self.region}.amazonaws.com/{self.pool_id}"

    @property
    def jwks_url(self) -> str:
        return f"{self.moto_url}/{self.pool_id}/.well-known/jwks.json"

    @classmethod
    def create(cls, moto_url: str, name: str = "invmon-reviewers", region: str = REGION) -> Cognito:
        idp = boto3.client("cognito-idp", region_name=region, endpoint_url=moto_url)
        pool = idp.create_user_pool(PoolName=name, AdminCreateUserConfig={"AllowAdminCreateUserOnly": True})
        pool_id = pool["UserPool"]["Id"]
        # USER_PASSWORD_AUTH lets the local login page check the password through moto; the deployed client
        # allows the managed login's code grant only (infra/review.py).
        client = idp.create_user_pool_client(UserPoolId=pool_id, ClientName="review-page", GenerateSecret=False,
                                             ExplicitAuthFlows=["ALLOW_USER_PASSWORD_AUTH",
                                                                "ALLOW_REFRESH_TOKEN_AUTH"])
        idp.create_group(GroupName=REVIEWERS_GROUP, UserPoolId=pool_id)
        return cls(moto_url, pool_id, client["UserPoolClient"]["ClientId"], region)

    def client(self) -> Any:
        return boto3.client("cognito-idp", region_name=self.region, endpoint_url=self.moto_url)

    def add_reviewer(self, username: str, password: str, *, group: bool = True) -> None:
        """What an administrator does (README): create the user, then add it to the reviewers group."""
        idp = self.client()
        idp.admin_create_user(UserPoolId=self.pool_id, Username=username, MessageAction="SUPPRESS")
        idp.admin_set_user_password(UserPoolId=self.pool_id, Username=username, Password=password, Permanent=True)
        if group:
            idp.admin_add_user_to_group(UserPoolId=self.pool_id, Username=username, GroupName=REVIEWERS_GROUP)

    def password_tokens(self, username: str, password: str, client_id: str | None = None) -> dict[str, Any]:
        result = self.client().initiate_auth(ClientId=client_id or self.client_id, AuthFlow="USER_PASSWORD_AUTH",
                                             AuthParameters={"USERNAME": username, "PASSWORD": password})
        return result["AuthenticationResult"]


class Authorizer:
    """The HTTP API JWT authorizer's checks, against the issuer's published keys."""

    def __init__(self, cognito: Cognito, audience: list[str]) -> None:
        self.cognito = cognito
        self.audience = audience
        self._keys = None

    def keys(self) -> Any:
        from joserfc.jwk import KeySet

        if self._keys is None:
            with urllib.request.urlopen(self.cognito.jwks_url, timeout=10) as response:
                self._keys = KeySet.import_key_set(json.loads(response.read()))
        return self._keys

    def claims(self, header: str | None) -> dict[str, Any]:
        from joserfc import jwt
        from joserfc.errors import JoseError

        if not header or not header.startswith("Bearer "):
            raise Unauthorized("no bearer token")
        token = header.removeprefix("Bearer ").strip()
        try:
            decoded = jwt.decode(token, self.keys(), algorithms=["RS256"])
        except (JoseError, ValueError) as error:
            raise Unauthorized(f"invalid token: {type(error).__name__}") from None
        claims = dict(decoded.claims)
        now = time.time()
        if claims.get("iss") != self.cognito.issuer:
            raise Unauthorized("wrong issuer")
        if not isinstance(claims.get("exp"), int | float) or claims["exp"] + LEEWAY_SECONDS <= now:
            raise Unauthorized("token expired")
        if isinstance(claims.get("nbf"), int | float) and claims["nbf"] - LEEWAY_SECONDS > now:
            raise Unauthorized("token not yet valid")
        audience = claims.get("aud", claims.get("client_id"))
        audiences = audience if isinstance(audience, list) else [audience]
        if not any(a in self.audience for a in audiences):
            raise Unauthorized("wrong audience")
        return claims


def http_api_claims(claims: Mapping[str, Any]) -> dict[str, str]:
    """Claims as the HTTP API hands them to an integration: strings, arrays as ``[a b]``."""
    out = {}
    for name, value in claims.items():
        out[name] = f"[{' '.join(map(str, value))}]" if isinstance(value, list) else str(value)
    return out


@dataclass
class _Context:
    function_name: str = "invmon-review-offline"
    memory_limit_in_mb: int = 256
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:000000000000:function:invmon-review-offline"
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


def api_event(method: str, path: str, query: str, headers: Mapping[str, str], body: bytes,
              claims: Mapping[str, Any]) -> dict[str, Any]:
    """The HTTP API payload format 2.0 event for one request (API Gateway developer guide, "Working with AWS
    Lambda proxy integrations for HTTP APIs")."""
    return {
        "version": "2.0", "routeKey": "$default", "rawPath": path, "rawQueryString": query,
        "headers": {k.lower(): v for k, v in headers.items()},
        "requestContext": {
            "accountId": "000000000000", "apiId": "offline", "domainName": LOOPBACK, "stage": "$default",
            "requestId": str(uuid.uuid4()), "routeKey": "$default", "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000"),
            "timeEpoch": int(time.time() * 1000),
            "http": {"method": method, "path": path, "protocol": "HTTP/1.1", "sourceIp": LOOPBACK,
                     "userAgent": headers.get("User-Agent", "")},
            "authorizer": {"jwt": {"claims": http_api_claims(claims), "scopes": None}},
        },
        "body": body.decode() if body else None,
        "isBase64Encoded": False,
    }


class LocalReviewServer:
    """The review page, the review API and the managed login's code flow, on one loopback port."""

    def __init__(self, cognito: Cognito, *, table: str, data_bucket: str, lease_seconds: int = 300,
                 web_dir: Path = WEB_DIR) -> None:
        self.cognito = cognito
        self.authorizer = Authorizer(cognito, [cognito.client_id])
        self.environment = {"COUNTS_TABLE": table, "DATA_BUCKET": data_bucket,
                            "REVIEW_LEASE_SECONDS": str(lease_seconds), "POWERTOOLS_SERVICE_NAME": "review"}
        self.web_dir = web_dir
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self._codes: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._env = contextlib.ExitStack()

    def config(self) -> dict[str, str]:
        return {"apiUrl": f"{self.url}/api", "authUrl": self.url, "clientId": self.cognito.client_id}

    def __enter__(self) -> LocalReviewServer:
        from lambdas.review import handler

        self._env.enter_context(patched_environ(self.environment))
        handler.reset()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                owner._dispatch(self, "GET")

            def do_POST(self) -> None:
                owner._dispatch(self, "POST")

            def do_OPTIONS(self) -> None:
                owner._send(self, 204, b"")

        self._server = http.server.ThreadingHTTPServer((LOOPBACK, self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self._env.close()
        from lambdas.review import handler

        handler.reset()

    # --- plumbing ---------------------------------------------------------------------------------------

    @staticmethod
    def _send(request: Any, status: int, body: bytes, content_type: str = "application/json",
              headers: Mapping[str, str] | None = None) -> None:
        request.send_response(status)
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(body)))
        request.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            request.send_header(name, value)
        request.end_headers()
        request.wfile.write(body)

    def _dispatch(self, request: Any, method: str) -> None:
        parsed = urllib.parse.urlsplit(request.path)
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        try:
            if parsed.path.startswith("/api/"):
                return self._api(request, method, parsed.path.removeprefix("/api"), parsed.query, body)
            if parsed.path == "/oauth2/authorize" and method == "GET":
                return self._authorize(request, urllib.parse.parse_qs(parsed.query))
            if parsed.path == "/login" and method == "POST":
                return self._login(request, urllib.parse.parse_qs(body.decode()))
            if parsed.path == "/oauth2/token" and method == "POST":
                return self._token(request, urllib.parse.parse_qs(body.decode()))
            if parsed.path == "/config.json":
                return self._send(request, 200, json.dumps(self.config()).encode())
            return self._static(request, parsed.path)
        except Exception as error:  # a bug here must show as a 500 with its cause, not a dropped connection
            return self._send(request, 500, json.dumps({"message": f"{type(error).__name__}: {error}"}).encode())

    def _static(self, request: Any, path: str) -> None:
        name = "index.html" if path in ("/", "") else path.lstrip("/")
        target = (self.web_dir / name).resolve()
        if self.web_dir.resolve() not in target.parents or not target.is_file():
            return self._send(request, 404, b"not found", "text/plain")
        return self._send(request, 200, target.read_bytes(),
                          _CONTENT_TYPES.get(target.suffix, "application/octet-stream"))

    def _api(self, request: Any, method: str, path: str, query: str, body: bytes) -> None:
        from lambdas.review import handler

        try:
            claims = self.authorizer.claims(request.headers.get("Authorization"))
        except Unauthorized as error:
            # API Gateway's own answer to a rejected token: 401 {"message":"Unauthorized"}.
            return self._send(request, 401, json.dumps({"message": "Unauthorized", "why": str(error)}).encode())
        event = api_event(method, path, query, dict(request.headers), body, claims)
        response = handler.handler(event, _Context())
        headers = {k: v for k, v in (response.get("headers") or {}).items() if k.lower() != "content-length"}
        content_type = headers.pop("Content-Type", headers.pop("content-type", "application/json"))
        payload = response.get("body") or ""
        data = base64.b64decode(payload) if response.get("isBase64Encoded") else payload.encode()
        return self._send(request, int(response["statusCode"]), data, content_type, headers)

    # --- the managed login's code flow (moto has none) -------------------------------------------------------

    def _authorize(self, request: Any, query: dict[str, list[str]]) -> None:
        get = {k: v[0] for k, v in query.items()}
        problems = [name for name in ("client_id", "redirect_uri", "code_challenge") if not get.get(name)]
        if get.get("response_type") != "code" or get.get("code_challenge_method") != "S256":
            problems.append("response_type=code and code_challenge_method=S256")
        if get.get("client_id") not in (None, self.cognito.client_id):
            problems.append("a known client_id")
        if problems:
            return self._send(request, 400, json.dumps({"error": "invalid_request", "needs": problems}).encode())
        hidden = "".join(f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
                         for k, v in get.items())
        page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Sign in</title></head>
<body><main><h1>Sign in to invmon review</h1><form method="post" action="/login">{hidden}
<p><label for="username">Email</label> <input id="username" name="username" autocomplete="username" required></p>
<p><label for="password">Password</label> <input id="password" name="password" type="password"
 autocomplete="current-password" required></p>
<p><button id="signin" type="submit">Sign in</button></p></form></main></body></html>"""
        return self._send(request, 200, page.encode(), "text/html; charset=utf-8")

    def _login(self, request: Any, form: dict[str, list[str]]) -> None:
        get = {k: v[0] for k, v in form.items()}
        try:
            tokens = self.cognito.password_tokens(get.get("username", ""), get.get("password", ""))
        except Exception as error:
            message = getattr(error, "response", {}).get("Error", {}).get("Message", str(error))
            return self._send(request, 401, f"sign-in failed: {html.escape(message)}".encode(), "text/plain")
        code = secrets.token_urlsafe(24)
        with self._lock:
            self._codes[code] = {"tokens": tokens, "challenge": get["code_challenge"], "client_id": get["client_id"],
                                 "redirect_uri": get["redirect_uri"], "expires": time.time() + 300}
        query = urllib.parse.urlencode({"code": code, **({"state": get["state"]} if get.get("state") else {})})
        return self._send(request, 302, b"", "text/plain", {"Location": f"{get['redirect_uri']}?{query}"})

    def _token(self, request: Any, form: dict[str, list[str]]) -> None:
        get = {k: v[0] for k, v in form.items()}
        with self._lock:
            grant = self._codes.pop(get.get("code", ""), None)  # a code is good once
        verifier = get.get("code_verifier", "")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
        if (grant is None or grant["expires"] < time.time() or get.get("grant_type") != "authorization_code"
                or get.get("client_id") != grant["client_id"] or get.get("redirect_uri") != grant["redirect_uri"]
                or not secrets.compare_digest(challenge, grant["challenge"])):
            return self._send(request, 400, json.dumps({"error": "invalid_grant"}).encode())
        tokens = grant["tokens"]
        answer = {"access_token": tokens["AccessToken"], "id_token": tokens["IdToken"],
                  "refresh_token": tokens.get("RefreshToken"), "token_type": "Bearer",
                  "expires_in": tokens.get("ExpiresIn", 3600)}
        return self._send(request, 200, json.dumps(answer).encode())


# --- a scripted reviewer, over HTTP ------------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any) -> None:
        return None


def sign_in(base_url: str, client_id: str, username: str, password: str) -> str:
    """The page's sign-in, as HTTP requests: authorize, log in, exchange the code with the PKCE verifier."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    redirect = f"{base_url}/"
    query = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect, "scope": "openid",
             "code_challenge": challenge, "code_challenge_method": "S256", "state": secrets.token_urlsafe(8)}
    with urllib.request.urlopen(f"{base_url}/oauth2/authorize?{urllib.parse.urlencode(query)}", timeout=10):
        pass
    opener = urllib.request.build_opener(_NoRedirect)
    form = urllib.parse.urlencode(query | {"username": username, "password": password}).encode()
    try:
        opener.open(urllib.request.Request(f"{base_url}/login", data=form), timeout=10)
        raise RuntimeError("sign-in did not redirect with a code")
    except urllib.error.HTTPError as error:
        if error.code != 302:
            raise RuntimeError(f"sign-in failed: HTTP {error.code} {error.read()[:200]!r}") from None
        location = error.headers["Location"]
    code = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)["code"][0]
    token_form = urllib.parse.urlencode({"grant_type": "authorization_code", "code": code, "client_id": client_id,
                                         "redirect_uri": redirect, "code_verifier": verifier}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{base_url}/oauth2/token", data=token_form),
                                timeout=10) as response:
        return json.loads(response.read())["access_token"]


def call(api_url: str, token: str | None, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One review API request; (status, JSON body)."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"{api_url}{path}", data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def review_all(api_url: str, token: str, truth: Mapping[str, int]) -> list[dict[str, Any]]:
    """Claim, load the photo, answer with the true count, until the queue is empty for this reviewer."""
    answers = []
    while True:
        status, claimed = call(api_url, token, "POST", "/claim")
        if status != 200:
            raise RuntimeError(f"claim failed: {status} {claimed}")
        item = claimed["item"]
        if item is None:
            return answers
        status, photo = call(api_url, token, "GET", f"/items/{item['id']}/photo")
        if status != 200:
            raise RuntimeError(f"photo failed: {status} {photo}")
        with urllib.request.urlopen(photo["url"], timeout=30) as response:
            response.read()
        if item["photo"] in truth:
            body = {"leaseId": item["leaseId"], "count": truth[item["photo"]]}
        else:
            body = {"leaseId": item["leaseId"], "unusable": True, "reason": "no ground truth for this photo"}
        status, result = call(api_url, token, "POST", f"/items/{item['id']}/answer", body)
        if status != 200:
            raise RuntimeError(f"answer failed: {status} {result}")
        answers.append(result)


def labels(data_bucket: str) -> list[str]:
    s3 = boto3.client("s3")
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=data_bucket, Prefix="raw/reviewed/"):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


def demo_step(progress: Any, synthesized: Any, moto_url: str, rows: list[dict[str, Any]]) -> None:
    """``invmon demo``'s review stage: the rows' records are re-read afterwards, so its table shows them."""
    from invmon import execution
    from invmon.table import render_table

    table = execution.physical_name(synthesized.logical_id("AWS::DynamoDB::Table", "CountCounts"))
    bucket = execution.physical_name(synthesized.logical_id("AWS::S3::Bucket", "StorageData"))
    truth = {row["record"]["key"]: row["truth"] for row in rows
             if row.get("truth") is not None and row["record"].get("key")}
    with progress.step("Review: a scripted reviewer signs in (moto's Cognito, code + PKCE) and answers every "
                       "pending upload with ABID's true count through the local review API"):
        cognito = Cognito.create(moto_url)
        password = secrets.token_urlsafe(12) + "aA1!"
        cognito.add_reviewer(DEMO_REVIEWER, password)
        with LocalReviewServer(cognito, table=table, data_bucket=bucket) as server:
            token = sign_in(server.url, cognito.client_id, DEMO_REVIEWER, password)
            answers = review_all(f"{server.url}/api", token, truth)
        records = boto3.resource("dynamodb").Table(table)
        for row in rows:
            record = row["record"]
            if record.get("pk"):
                row["record"] = records.get_item(Key={"pk": record["pk"], "sk": record["sk"]},
                                                 ConsistentRead=True).get("Item", record)
        shown = [[a["photo"].rsplit("/", 1)[-1], "unusable" if a["unusable"] else a["reviewedCount"],
                  "" if a["modelCount"] is None else a["modelCount"], a["modelStatus"],
                  {True: "yes", False: "no", None: ""}[a["agrees"]]] for a in answers]
        print(f"      {len(answers)} photos reviewed:")
        for line in render_table(["upload", "person", "model", "model's status", "agree"], shown).splitlines():
            print(f"      {line}")
        print(f"      label files under s3://{bucket}/raw/reviewed/:")
        for key in labels(bucket):
            print(f"        {key}")


def shown_status(record: Mapping[str, Any]) -> str:
    """A reviewed record's status for the demo's table: the person's count beside the model's decision."""
    person = "unusable" if record.get("reviewUnusable") else f"person {_number(record.get('reviewedCount'))}"
    return f"reviewed: {person}, model {record.get('modelStatus')}"


# --- invmon review stats -------------------------------------------------------------------------------------------


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for a proportion (95 % by default); (0, 1) for no trials."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _number(value: Any) -> Any:
    return int(value) if isinstance(value, Decimal) else value


def review_figures(reviewed: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Audit precision per confident status, and wrong consignments caught per 100 reviews."""
    out: dict[str, Any] = {"reviews": len(reviewed), "audit": {}}
    for status in ("counted", "match"):
        audited = [r for r in reviewed if r.get("reviewAudit") and r.get("modelStatus") == status
                   and not r.get("reviewUnusable")]
        right = sum(1 for r in audited if _number(r.get("reviewedCount")) == _number(
            r.get("count") if status == "counted" else r.get("expectedCount")))
        low, high = wilson(right, len(audited))
        out["audit"][status] = {"audited": len(audited), "right": right,
                                "precision": right / len(audited) if audited else None, "ci95": [low, high]}
    answered = [r for r in reviewed if not r.get("reviewUnusable")]
    caught = sum(1 for r in answered if r.get("expectedCount") is not None
                 and _number(r.get("reviewedCount")) != _number(r.get("expectedCount")))
    out["wrongConsignmentsCaught"] = caught
    out["caughtPer100Reviews"] = 100.0 * caught / len(reviewed) if reviewed else None
    return out


def format_figures(figures: Mapping[str, Any]) -> str:
    lines = [f"{figures['reviews']} reviews"]
    for status, audit in figures["audit"].items():
        if audit["audited"]:
            low, high = audit["ci95"]
            lines.append(f"production precision of '{status}' (audit sample): {audit['precision']:.3f} "
                         f"({audit['right']}/{audit['audited']}; 95 % Wilson interval {low:.3f}-{high:.3f})")
        else:
            lines.append(f"production precision of '{status}': no audited photos yet")
    per100 = figures["caughtPer100Reviews"]
    lines.append(f"wrong consignments caught: {figures['wrongConsignmentsCaught']}"
                 + (f" ({per100:.1f} per 100 reviews)" if per100 is not None else ""))
    return "\n".join(lines)


# --- a backend without the pipeline: tests, the browser test and `invmon review serve` ---------------------------


def create_counts_table(name: str) -> Any:
    """The counts table's keys and the two indexes the review loop reads (infra/count.py defines the deployed
    one; tests/infra/test_review.py keeps the two equal)."""
    dynamodb = boto3.client("dynamodb")
    string = "S"
    dynamodb.create_table(
        TableName=name, BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[{"AttributeName": n, "AttributeType": string}
                              for n in ("pk", "sk", "status", "countedAt", "reviewQueue", "reviewRank")],
        GlobalSecondaryIndexes=[
            {"IndexName": index, "Projection": {"ProjectionType": "ALL"},
             "KeySchema": [{"AttributeName": hash_key, "KeyType": "HASH"},
                           {"AttributeName": range_key, "KeyType": "RANGE"}]}
            for index, hash_key, range_key in (("byStatus", "status", "countedAt"),
                                               ("reviewQueue", "reviewQueue", "reviewRank"))
        ],
    )
    return boto3.resource("dynamodb").Table(name)


def seed_photo(table: Any, bucket: str, key: str, photo: bytes, *, count: int, confidence: float,
               expected: int | None, status: str, audit: bool = False, counted_at: str | None = None
               ) -> dict[str, Any]:
    """Upload a photo and store the count record the count path would have written, queued for review."""
    from datetime import UTC, datetime

    from lambdas.count import records as rec
    from lambdas.review import queue as q

    put = boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=photo)
    prediction = {"count": count, "confidence": confidence, "classes": list(range(7)),
                  "probabilities": [confidence if c == count else (1 - confidence) / 6 for c in range(7)],
                  "model": "abid-effnet-lite0"}
    item = rec.build_record(bucket=bucket, key=key, version_id=put.get("VersionId"), size=len(photo),
                            prediction=prediction, rejection=None, expected=expected,
                            expected_from="metadata" if expected is not None else None, threshold=None,
                            counted_at=counted_at or datetime.now(UTC).isoformat(timespec="milliseconds"),
                            source="event")
    item["status"] = status  # the status under test, whatever the stand-in prediction would give
    policy = q.QueuePolicy(statuses=(status,) if not audit else (), audit_rate=1.0 if audit else 0.0)
    q.mark(item, policy)
    table.put_item(Item=item)
    return item


def seed_from_model(table: Any, bucket: str, data: Path, model_dir: Path, n: int = 12) -> list[dict[str, Any]]:
    """Count the demo's held-out photos with the shipped model (its serving functions, in this process), store
    the records the count path would write, queued by the default policy (statuses and the audit sample)."""
    from datetime import UTC, datetime

    from invmon.demo import consignment, hold_out, never_trained_on
    from lambdas.count import records as rec
    from lambdas.review import queue as q
    from ml import abid, inference

    records, _ = abid.scan_folder(data)
    _, held = hold_out(records, n, never_trained_on(model_dir))
    model = inference.model_fn(str(model_dir))
    s3 = boto3.client("s3")
    stored = []
    for index, record in enumerate(held):
        body = (data / record.image_key).read_bytes()
        answer = json.loads(inference.output_fn(inference.predict_fn(inference.input_fn(body, "image/jpeg"), model),
                                                "application/json"))
        key = f"incoming/bin {record.image_id}.jpg"
        put = s3.put_object(Bucket=bucket, Key=key, Body=body)
        item = rec.build_record(bucket=bucket, key=key, version_id=put.get("VersionId"), size=len(body),
                                prediction=rec.read_prediction(answer), rejection=None,
                                expected=consignment(record, index), expected_from="metadata", threshold=None,
                                counted_at=datetime.now(UTC).isoformat(timespec="milliseconds"), source="event")
        q.mark(item, q.QueuePolicy())
        table.put_item(Item=item)
        stored.append(item)
    return stored


def serve(data: Path, model_dir: Path, *, open_browser: bool = True) -> int:
    """``invmon review serve``: the demo's backend (moto, the counts table, the shipped model's counts of the
    held-out photos, a user pool with one reviewer) and the page on 127.0.0.1, until Ctrl-C."""
    import webbrowser

    from invmon.local import MotoServer

    with MotoServer() as moto:
        bucket, name = "invmon-review-data", "invmon-review-counts"
        boto3.client("s3").create_bucket(Bucket=bucket)
        boto3.client("s3").put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
        table = create_counts_table(name)
        stored = seed_from_model(table, bucket, data, model_dir)
        cognito = Cognito.create(moto.url)
        password = secrets.token_urlsafe(9) + "aA1!"
        cognito.add_reviewer(DEMO_REVIEWER, password)
        with LocalReviewServer(cognito, table=name, data_bucket=bucket) as server:
            queued = sum(1 for item in stored if "reviewQueue" in item)
            print(f"{queued} of {len(stored)} photos wait for review (the shipped model's own decisions)")
            print(f"review page: {server.url}/\n  sign in as {DEMO_REVIEWER} with password {password}")
            print("Ctrl-C stops it (nothing is kept)")
            if open_browser:
                webbrowser.open(f"{server.url}/")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                print("\nstopped")
    return 0


def print_stats(table: Any) -> int:
    """``invmon review stats``: production precision from the audit sample and consignments caught."""
    from lambdas.review import store

    print(format_figures(review_figures(store.reviewed(table))))
    return 0
