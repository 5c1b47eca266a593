"""The review page in the system's headless Chromium (WebDriver, no browser download): sign in through the
managed-login flow (code + PKCE, tokens from moto's cognito-idp), claim, see the photo, type a count with the
keyboard, submit, get the next photo; the table and raw/reviewed/ then hold the answer. Saves a screenshot
(docs/review-page.png, shown in the README). Costs about 10 s.

Chromium and its driver come from the system (README set-up: ``apt-get install chromium chromium-driver``);
Selenium is given both paths, so Selenium Manager never tries to download a browser.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import boto3
import pytest

from invmon import review
from invmon.local import MotoServer
from lambdas.count import records as rec
from lambdas.review import store

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "abid-sample" / "bin-images"
SCREENSHOT = ROOT / "docs" / "review-page.png"
PASSWORD = "Review-Passw0rd!"


def _browser_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("needs Chromium and chromedriver (README set-up: apt-get install chromium chromium-driver); "
                    "this machine could not install them")
    return browser, driver


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is part of the dev extra")
    from selenium.webdriver.chrome.service import Service

    binary, driver = _browser_paths()
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not reach out for a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1000",
                 "--disable-gpu"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    chrome.set_page_load_timeout(30)
    yield chrome
    chrome.quit()


def test_a_reviewer_signs_in_counts_a_photo_with_the_keyboard_and_gets_the_next(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    with MotoServer() as moto:
        bucket = f"data-{uuid.uuid4().hex[:8]}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        table = review.create_counts_table("counts")
        first = review.seed_photo(table, bucket, "incoming/bin 01046.jpg", (SAMPLE / "01046.jpg").read_bytes(),
                                  count=3, confidence=0.3, expected=5, status=rec.MISMATCH,
                                  counted_at="2026-12-06T10:00:00.000+00:00")
        review.seed_photo(table, bucket, "incoming/bin 01062.jpg", (SAMPLE / "01062.jpg").read_bytes(),
                          count=1, confidence=0.6, expected=1, status=rec.LOW_CONFIDENCE,
                          counted_at="2026-12-06T10:01:00.000+00:00")
        cognito = review.Cognito.create(moto.url)
        cognito.add_reviewer("ana@example.com", PASSWORD)
        with review.LocalReviewServer(cognito, table="counts", data_bucket=bucket) as server:
            wait = WebDriverWait(browser, 20)
            browser.get(server.url + "/")
            browser.find_element(By.ID, "signin").click()
            wait.until(ec.presence_of_element_located((By.ID, "username"))).send_keys("ana@example.com")
            browser.find_element(By.ID, "password").send_keys(PASSWORD + Keys.ENTER)

            # Signed in and holding the most urgent photo (the mismatch), shown with its consignment's count.
            wait.until(lambda b: b.find_element(By.ID, "caption").text == first["key"])
            wait.until(lambda b: b.execute_script(
                "const i = document.getElementById('photo'); return i.complete && i.naturalWidth > 0"))
            assert "5" in browser.find_element(By.ID, "consignment").text
            count = browser.find_element(By.ID, "count")
            assert browser.switch_to.active_element == count  # keyboard-first: the count field has the focus
            # Every control is labelled.
            assert browser.find_element(By.CSS_SELECTOR, "label[for=count]").text
            assert browser.find_element(By.ID, "unusable").text == "Can't tell"
            browser.save_screenshot(str(SCREENSHOT))

            count.send_keys("4" + Keys.ENTER)
            wait.until(lambda b: b.find_element(By.ID, "caption").text == "incoming/bin 01062.jpg")
            wait.until(lambda b: "done today: 1" in b.find_element(By.ID, "progress").text)

        record = table.get_item(Key={"pk": first["pk"], "sk": first["sk"]})["Item"]
        assert record["status"] == "reviewed" and record["reviewedCount"] == 4 and record["count"] == 3
        label = store.label_keys(store.label_id(first["key"], first["versionId"]))
        listed = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="raw/reviewed/")
                  .get("Contents", [])}
        assert set(label) == listed
