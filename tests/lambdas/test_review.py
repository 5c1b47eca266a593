"""The review loop: queue marking, the review API behind the local JWT authorizer, labels, training use.

The API tests talk HTTP to invmon.review.LocalReviewServer (the review Lambda's handler behind a JWT check as
API Gateway's authorizer makes it) with tokens that moto's cognito-idp (server mode) issued and signed. One
moto server and user pool per module, a fresh counts table per test. About 60 s here (2 loaded cores).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from decimal import Decimal
from pathlib import Path

import boto3
import pytest

from invmon import review
from invmon.local import MotoServer
from lambdas.count import records as rec
from lambdas.pack import layout
from lambdas.review import queue as q
from lambdas.review import store
from ml import abid

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "abid-sample"
PASSWORD = "Review-Passw0rd!"


@pytest.fixture(scope="module")
def moto():
    with MotoServer() as server:
        yield server


@pytest.fixture(scope="module")
def cognito(moto):
    pool = review.Cognito.create(moto.url)
    for name in ("alice@example.com", "bob@example.com"):
        pool.add_reviewer(name, PASSWORD)
    pool.add_reviewer("mallory@example.com", PASSWORD, group=False)
    return pool


@pytest.fixture(scope="module")
def tokens(cognito):
    return {name: cognito.password_tokens(f"{name}@example.com", PASSWORD)["AccessToken"]
            for name in ("alice", "bob", "mallory")}


@pytest.fixture
def backend(moto, cognito):
    bucket = f"data-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    boto3.client("s3").put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    table = review.create_counts_table(f"counts-{uuid.uuid4().hex[:12]}")
    with review.LocalReviewServer(cognito, table=table.name, data_bucket=bucket, lease_seconds=300) as server:
        yield {"table": table, "bucket": bucket, "api": f"{server.url}/api", "server": server}


def photo(image_id: str = "01046") -> bytes:
    return (SAMPLE / "bin-images" / f"{image_id}.jpg").read_bytes()


def seed(backend, image_id: str = "01046", **overrides):
    args = {"count": 3, "confidence": 0.4, "expected": 5, "status": rec.MISMATCH} | overrides
    return review.seed_photo(backend["table"], backend["bucket"], f"incoming/bin {image_id}.jpg", photo(image_id),
                             **args)


def api(backend, token, method, path, body=None):
    return review.call(backend["api"], token, method, path, body)


# --- the queue ----------------------------------------------------------------------------------------------------


def test_statuses_that_need_a_person_join_the_sparse_index_and_others_do_not():
    policy = q.QueuePolicy()
    for status, queued in ((rec.MISMATCH, True), (rec.LOW_CONFIDENCE, True), (rec.REJECTED, False)):
        item = q.mark({"key": "incoming/a.jpg", "versionId": "v1", "status": status, "confidence": 0.3,
                       "countedAt": "2026-12-06T10:00:00.000+00:00"}, policy)
        assert (q.QUEUE_KEY in item and q.RANK_KEY in item) is queued, status


def test_priority_is_the_discrepancy_probability_and_falls_back_to_one_minus_confidence():
    with_probability = {"discrepancyProbability": 0.9, "confidence": 0.99, "countedAt": "b"}
    without = {"confidence": 0.8, "countedAt": "a"}
    assert q.priority(with_probability) == 0.9
    assert q.priority(without) == pytest.approx(0.2)
    # Ascending rank order = most likely discrepancy first.
    assert q.rank(with_probability) < q.rank(without)


def test_audit_sampling_rate_holds_within_its_binomial_tolerance():
    # 20,000 confident decisions at the default 2 %: the number sampled is Binomial(20000, 0.02), mean 400 and
    # standard deviation sqrt(20000 * 0.02 * 0.98) = 19.8; 4.5 standard deviations (~89) bound a correct
    # sampler's failure rate below one in 100,000, while a sampler off by a quarter (300 or 500) fails.
    policy = q.QueuePolicy(audit_rate=0.02)
    n = 20_000
    sampled = sum(1 for i in range(n) if q.QUEUE_KEY in q.mark(
        {"key": f"incoming/photo-{i}.jpg", "versionId": "null", "status": rec.COUNTED if i % 2 else rec.MATCH,
         "confidence": 0.95, "countedAt": "2026-12-06T10:00:00.000+00:00"}, policy))
    expected, sd = n * 0.02, (n * 0.02 * 0.98) ** 0.5
    assert abs(sampled - expected) <= 4.5 * sd, sampled
    # The same photo always gets the same draw (a redelivery cannot add a second audit).
    assert q.audit_draw("incoming/x.jpg", "v1") == q.audit_draw("incoming/x.jpg", "v1")


def test_the_daily_cap_stops_queueing_once_reached(backend):
    policy = q.QueuePolicy(max_per_day=2)
    take = q.day_slot_taker(backend["table"], policy)
    marked = [q.mark({"key": f"incoming/{i}.jpg", "status": rec.MISMATCH, "confidence": 0.5,
                      "countedAt": "2026-12-06T10:00:00.000+00:00"}, policy, take) for i in range(4)]
    assert [q.QUEUE_KEY in item for item in marked] == [True, True, False, False]
    assert "reviewMaxPerDay" in marked[-1]["reviewSkipped"]


def test_a_full_day_gives_a_place_to_a_photo_more_likely_wrong_never_to_a_less_likely_one(backend):
    # A day's places went to the first photos to arrive; a later, likelier discrepancy must still reach a person.
    # The least likely waiting photo leaves for it, but never an audit item or a photo a reviewer holds.
    table = backend["table"]
    policy = q.QueuePolicy(max_per_day=2, audit_rate=1.0)
    take, displace = q.day_slot_taker(table, policy), q.displacer(table, policy)

    def count(name: str, probability: str, status: str = rec.MISMATCH) -> dict:
        item = {"pk": f"photo#incoming/{name}.jpg", "sk": "null", "key": f"incoming/{name}.jpg", "versionId": "null",
                "status": status, "discrepancyProbability": Decimal(probability), "confidence": Decimal("0.5"),
                "countedAt": "2026-12-06T10:00:00.000+00:00"}
        table.put_item(Item=q.mark(item, policy, take, displace))
        return item

    count("early", "0.30")
    count("audit", "0.01", status=rec.MATCH)
    count("likely", "0.90")
    unlikely = count("unlikely", "0.20")
    waiting = {item["key"] for item in store.pending(table)}
    assert waiting == {"incoming/likely.jpg", "incoming/audit.jpg"}
    early = table.get_item(Key={"pk": "photo#incoming/early.jpg", "sk": "null"})["Item"]
    assert q.QUEUE_KEY not in early and "displaced" in early["reviewSkipped"] and "0.900" in early["reviewSkipped"]
    assert "no photo waiting was less likely wrong" in unlikely["reviewSkipped"]

    table.update_item(Key={"pk": "photo#incoming/likely.jpg", "sk": "null"}, UpdateExpression="SET leaseUntil = :t",
                      ExpressionAttributeValues={":t": int(time.time()) + 300})
    held_back = count("likeliest", "0.95")
    assert q.QUEUE_KEY not in held_back
    assert {item["key"] for item in store.pending(table)} == waiting
    late_audit = count("late-audit", "0.50", status=rec.MATCH)
    assert q.QUEUE_KEY not in late_audit and "audit samples take free places only" in late_audit["reviewSkipped"]


# --- claim and lease -------------------------------------------------------------------------------------------------


class _RacingTable:
    """A table whose queries wait until both reviewers have read the index, so both try the same photo with
    the same stale view of it. DynamoDB applies each conditional write atomically; moto's threaded server
    evaluates a condition and writes in separate steps, so the writes go through one lock here, as they would
    reach one item in DynamoDB: one after the other, in either order."""

    _writes = threading.Lock()

    def __init__(self, table, barrier: threading.Barrier) -> None:
        self._table, self._barrier = table, barrier

    def query(self, **kwargs):
        page = self._table.query(**kwargs)
        self._barrier.wait(timeout=10)
        return page

    def update_item(self, **kwargs):
        with self._writes:
            return self._table.update_item(**kwargs)

    def __getattr__(self, name):
        return getattr(self._table, name)


def test_two_reviewers_racing_for_one_photo_one_wins(backend):
    seed(backend)
    barrier = threading.Barrier(2)
    results: dict[str, object] = {}

    def reviewer(sub: str) -> None:
        results[sub] = store.claim(_RacingTable(backend["table"], barrier), sub, lease_seconds=300)

    threads = [threading.Thread(target=reviewer, args=(sub,)) for sub in ("alice", "bob")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [sub for sub, item in results.items() if item is not None]
    assert len(winners) == 1, results
    version = store.parse_item_id(results[winners[0]]["id"])[1]
    held = backend["table"].get_item(Key={"pk": "photo#incoming/bin 01046.jpg", "sk": f"version#{version}"})["Item"]
    assert held["leaseHolder"] == winners[0]


def test_claims_over_http_never_give_two_reviewers_the_same_photo(backend, tokens):
    seed(backend, "01046")
    seed(backend, "01062", count=1, confidence=0.2, expected=1, status=rec.LOW_CONFIDENCE)
    first = api(backend, tokens["alice"], "POST", "/claim")
    second = api(backend, tokens["bob"], "POST", "/claim")
    third = api(backend, tokens["bob"], "POST", "/claim")
    assert first[0] == second[0] == 200
    assert first[1]["item"]["photo"] != second[1]["item"]["photo"]
    # Bob claiming again gets his own photo back, not Alice's.
    assert third[1]["item"]["photo"] == second[1]["item"]["photo"]


def test_an_expired_lease_returns_the_photo_to_the_queue(backend):
    seed(backend)
    now = store.now_epoch()
    first = store.claim(backend["table"], "alice", lease_seconds=300, now=now)
    assert store.claim(backend["table"], "bob", lease_seconds=300, now=now + 299) is None
    second = store.claim(backend["table"], "bob", lease_seconds=300, now=now + 301)
    assert second is not None and second["photo"] == first["photo"] and second["leaseId"] != first["leaseId"]
    # Alice's old lease no longer answers.
    with pytest.raises(store.Conflict):
        store.answer(backend["table"], boto3.client("s3"), first["id"], "alice", first["leaseId"],
                     store.Answer(count=5), data_bucket=backend["bucket"], now=now + 302)


# --- the authorizer --------------------------------------------------------------------------------------------------


def _signed(claims: dict, key) -> str:
    from joserfc import jwt

    return jwt.encode({"alg": "RS256", "kid": "dummy"}, claims, key)


def _moto_key():
    """moto's own signing key (what its cognito-idp signs every token with), to mint an expired token."""
    from joserfc.jwk import RSAKey
    from moto.cognitoidp.models import load_resource

    return RSAKey.import_key(load_resource("cognitoidp/resources/jwks-private.json"))


def test_forged_expired_and_wrong_audience_tokens_get_401(backend, cognito, tokens):
    from joserfc.jwk import RSAKey

    seed(backend)
    good = tokens["alice"]
    assert api(backend, good, "POST", "/claim")[0] == 200
    claims = json.loads(__import__("base64").urlsafe_b64decode(good.split(".")[1] + "=="))
    forged = _signed(claims, RSAKey.generate_key(2048))
    expired = _signed(claims | {"exp": int(time.time()) - 60, "iat": int(time.time()) - 3700}, _moto_key())
    other_client = cognito.client().create_user_pool_client(
        UserPoolId=cognito.pool_id, ClientName="another-app", ExplicitAuthFlows=["ALLOW_USER_PASSWORD_AUTH"])
    wrong_audience = cognito.password_tokens("alice@example.com", PASSWORD,
                                             other_client["UserPoolClient"]["ClientId"])["AccessToken"]
    tampered = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    for name, token in (("forged", forged), ("expired", expired), ("wrong audience", wrong_audience),
                        ("tampered", tampered), ("none", None)):
        status, body = api(backend, token, "POST", "/claim")
        assert status == 401, (name, body)


def test_a_user_outside_the_reviewers_group_gets_403(backend, tokens):
    status, body = api(backend, tokens["mallory"], "POST", "/claim")
    assert status == 403 and "reviewers" in body["message"]


# --- answers ---------------------------------------------------------------------------------------------------------


def test_an_answer_for_a_photo_the_reviewer_does_not_hold_gets_409(backend, tokens):
    seed(backend)
    item = api(backend, tokens["alice"], "POST", "/claim")[1]["item"]
    status, body = api(backend, tokens["bob"], "POST", f"/items/{item['id']}/answer",
                       {"leaseId": item["leaseId"], "count": 3})
    assert status == 409 and "do not hold" in body["message"]
    status, _ = api(backend, tokens["alice"], "POST", f"/items/{item['id']}/answer",
                    {"leaseId": "not-the-lease", "count": 3})
    assert status == 409


@pytest.mark.parametrize("raw", [b'{"leaseId": "L", "count": -1}', b'{"leaseId": "L", "count": 1000000000}',
                                 b'{"leaseId": "L", "count": "3"}', b'{"leaseId": "L", "count": NaN}',
                                 b'{"leaseId": "L", "count": true}', b'{"leaseId": "L", "count": 3.0}',
                                 b'{"leaseId": "L"}', b'{"leaseId": "L", "unusable": true}', b"not json", b"[]"])
def test_counts_that_are_not_whole_numbers_from_0_to_1000_get_400_with_a_reason(backend, tokens, raw):
    seed(backend)
    item = api(backend, tokens["alice"], "POST", "/claim")[1]["item"]
    status, body = api(backend, tokens["alice"], "POST", f"/items/{item['id']}/answer",
                       raw.replace(b'"L"', json.dumps(item["leaseId"]).encode()))
    assert status == 400 and body["message"], body
    # Nothing was recorded: the photo is still held and pending.
    record = backend["table"].get_item(Key={"pk": "photo#incoming/bin 01046.jpg",
                                            "sk": f"version#{store.parse_item_id(item['id'])[1]}"})["Item"]
    assert record["status"] == rec.MISMATCH and record[q.QUEUE_KEY] == q.PENDING


def test_a_bad_item_id_and_an_unknown_route_get_4xx(backend, tokens):
    assert api(backend, tokens["alice"], "GET", "/items/%%%/photo")[0] == 400
    assert api(backend, tokens["alice"], "GET", "/nothing")[0] == 404


def test_the_presigned_url_is_issued_only_for_the_claimed_item(backend, tokens):
    seed(backend, "01046")
    seed(backend, "01062", count=1, confidence=0.3, expected=1, status=rec.LOW_CONFIDENCE)
    mine = api(backend, tokens["alice"], "POST", "/claim")[1]["item"]
    others = api(backend, tokens["bob"], "POST", "/claim")[1]["item"]
    assert api(backend, tokens["bob"], "GET", f"/items/{mine['id']}/photo")[0] == 409
    status, link = api(backend, tokens["alice"], "GET", f"/items/{mine['id']}/photo")
    assert status == 200 and link["expiresIn"] <= 300
    with urllib.request.urlopen(link["url"]) as response:
        assert response.read() == photo(mine["photo"].rsplit(" ", 1)[-1].removesuffix(".jpg"))
    assert api(backend, tokens["alice"], "GET", f"/items/{others['id']}/photo")[0] == 409


def test_an_answer_is_recorded_once_and_written_as_an_abid_label(backend, tokens):
    seed(backend, "01046", count=3, expected=5)
    item = api(backend, tokens["alice"], "POST", "/claim")[1]["item"]
    assert item["expectedCount"] == 5 and item["modelCount"] == 3
    body = {"leaseId": item["leaseId"], "count": 4}
    status, result = api(backend, tokens["alice"], "POST", f"/items/{item['id']}/answer", body)
    assert status == 200, result
    assert result["status"] == "reviewed" and result["reviewedCount"] == 4 and result["modelCount"] == 3
    assert result["agrees"] is False and result["modelStatus"] == rec.MISMATCH
    # Idempotent: the same answer again changes nothing; a different one with the same lease is refused.
    assert api(backend, tokens["alice"], "POST", f"/items/{item['id']}/answer", body) == (200, result)
    assert api(backend, tokens["alice"], "POST", f"/items/{item['id']}/answer", body | {"count": 6})[0] == 409
    history = backend["table"].query(KeyConditionExpression="pk = :pk",
                                     ExpressionAttributeValues={":pk": "review#incoming/bin 01046.jpg"})["Items"]
    assert len(history) == 1 and history[0]["reviewer"] and history[0]["modelCount"] == 3
    record = backend["table"].get_item(Key={"pk": "photo#incoming/bin 01046.jpg",
                                            "sk": f"version#{store.parse_item_id(item['id'])[1]}"})["Item"]
    assert q.QUEUE_KEY not in record and record["reviewedBy"] == history[0]["reviewer"]
    # The label: ABID's layout under raw/reviewed/, a server-side copy of the photo, never an ABID id.
    s3 = boto3.client("s3")
    image_id = store.label_id(record["key"], record["versionId"])
    image_key, metadata_key = layout.raw_keys(image_id)
    assert image_key == f"raw/reviewed/bin-images/{image_id}.jpg" and not image_id.isdigit()
    assert s3.get_object(Bucket=backend["bucket"], Key=image_key)["Body"].read() == photo("01046")
    metadata = s3.get_object(Bucket=backend["bucket"], Key=metadata_key)["Body"].read()
    assert abid.parse_metadata(image_id, metadata).quantity == 4
    provenance = json.loads(metadata)["provenance"]
    assert provenance["reviewer"] == record["reviewedBy"] and provenance["modelCount"] == 3


def test_a_later_answer_replaces_the_label_and_unusable_removes_it(backend):
    seed(backend, "01046", count=3, expected=5)
    table, s3, bucket = backend["table"], boto3.client("s3"), backend["bucket"]
    first = store.claim(table, "alice", lease_seconds=300)
    store.answer(table, s3, first["id"], "alice", first["leaseId"], store.Answer(count=4), data_bucket=bucket)
    key, version = store.parse_item_id(first["id"])
    _, metadata_key = store.label_keys(store.label_id(key, version))
    # The photo is queued again (a second opinion), and answered again by someone else.
    table.update_item(Key={"pk": f"photo#{key}", "sk": f"version#{version}"},
                      UpdateExpression="SET reviewQueue = :p, reviewRank = :r",
                      ExpressionAttributeValues={":p": q.PENDING, ":r": "0.5#x"})
    time.sleep(1.1)  # history items are keyed by the second
    second = store.claim(table, "bob", lease_seconds=300)
    store.answer(table, s3, second["id"], "bob", second["leaseId"], store.Answer(count=6), data_bucket=bucket)
    assert json.loads(s3.get_object(Bucket=bucket, Key=metadata_key)["Body"].read())["EXPECTED_QUANTITY"] == 6
    record = table.get_item(Key={"pk": f"photo#{key}", "sk": f"version#{version}"})["Item"]
    assert record["modelStatus"] == rec.MISMATCH  # the model's own status survives a second review
    history = table.query(KeyConditionExpression="pk = :pk", ExpressionAttributeValues={":pk": f"review#{key}"})
    assert [h["reviewedCount"] for h in history["Items"]] == [4, 6]
    table.update_item(Key={"pk": f"photo#{key}", "sk": f"version#{version}"},
                      UpdateExpression="SET reviewQueue = :p, reviewRank = :r",
                      ExpressionAttributeValues={":p": q.PENDING, ":r": "0.5#x"})
    third = store.claim(table, "alice", lease_seconds=300)
    store.answer(table, s3, third["id"], "alice", third["leaseId"], store.Answer(unusable_reason="blurred"),
                 data_bucket=bucket)
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="raw/reviewed/").get("Contents", [])
    assert listed == []


def test_audit_items_are_shown_blind(backend, tokens):
    seed(backend, "01046", count=5, confidence=0.97, expected=5, status=rec.MATCH, audit=True)
    item = api(backend, tokens["alice"], "POST", "/claim")[1]["item"]
    assert item["audit"] is True
    assert "expectedCount" not in item and "modelCount" not in item and "status" not in item


def test_skip_returns_the_photo_to_others_and_stats_count_answers(backend, tokens):
    seed(backend)
    item = api(backend, tokens["alice"], "POST", "/claim")[1]["item"]
    assert api(backend, tokens["alice"], "POST", f"/items/{item['id']}/skip", {"leaseId": item["leaseId"]})[0] == 200
    assert api(backend, tokens["alice"], "POST", "/claim")[1]["item"] is None
    again = api(backend, tokens["bob"], "POST", "/claim")[1]["item"]
    assert again["photo"] == item["photo"]
    api(backend, tokens["bob"], "POST", f"/items/{again['id']}/answer", {"leaseId": again["leaseId"], "count": 3})
    stats = api(backend, tokens["bob"], "GET", "/stats")[1]
    assert stats["pending"] == 0 and stats["answeredToday"] == 1 and stats["agreementToday"] == 1.0


# --- stats -----------------------------------------------------------------------------------------------------------


def test_wilson_interval_matches_the_textbook_value():
    # 8 right out of 10 at 95 %: 0.4902 to 0.9433 (Wilson, 1927; e.g. Newcombe 1998, table I method 3).
    low, high = review.wilson(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)


def test_review_stats_reads_the_reviewed_records_through_the_status_index(backend, capsys):
    seed(backend, "01046", count=5, confidence=0.97, expected=5, status=rec.MATCH, audit=True)
    seed(backend, "01062", count=1, confidence=0.3, expected=3, status=rec.MISMATCH)
    s3, table = boto3.client("s3"), backend["table"]
    truth = {"incoming/bin 01046.jpg": 5, "incoming/bin 01062.jpg": 1}
    while (item := store.claim(table, "alice", lease_seconds=300)) is not None:
        store.answer(table, s3, item["id"], "alice", item["leaseId"], store.Answer(count=truth[item["photo"]]),
                     data_bucket=backend["bucket"])
    review.print_stats(table)
    out = capsys.readouterr().out
    assert "2 reviews" in out and "production precision of 'match' (audit sample): 1.000 (1/1" in out
    assert "wrong consignments caught: 1 (50.0 per 100 reviews)" in out


def test_the_schedule_measures_the_queue_for_the_dashboard_and_its_alarm(backend):
    from lambdas.review import handler

    seed(backend, "01046", counted_at="2026-12-06T10:00:00.000+00:00")
    figures = handler.handler({"source": "aws.events", "detail-type": "Scheduled Event"}, review._Context())
    assert figures["pending"] == 1 and figures["oldestPendingSeconds"] > 0
