"""The web console in a real headless Chromium (Debian's, driven by its chromedriver):
upload a corpus, start a tiny job, watch its loss curve grow, stream from the playground."""

from __future__ import annotations

import shutil
import time

import pytest
from conftest import SMALL_CORPUS

from lmforge.v1 import training_pb2

from .conftest import ALICE

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (shutil.which("chromium") and shutil.which("chromedriver")),
        reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
    ),
]


@pytest.fixture(scope="module")
def browser(tmp_path_factory, base_url):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1280,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):  # fmt: skip
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        # The key goes in the header field; the page keeps it and sends it with every call.
        driver.get(base_url)
        key = driver.find_element(By.ID, "api-key")
        key.send_keys(ALICE)
        key.send_keys("\t")
        yield driver
    finally:
        driver.quit()


def _text(driver, css: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, css).text


def _wait(driver, predicate, timeout: float = 60.0, what: str = ""):
    # The console re-renders its tables as events arrive: an element found a moment ago may
    # be gone by the time it is read (seen once under load), so a stale one means "try again".
    return WebDriverWait(
        driver, timeout, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,)
    ).until(lambda d: predicate(d), message=what)


def _click(driver, css: str) -> None:
    def click(d):
        d.find_element(By.CSS_SELECTOR, css).click()
        return True

    _wait(driver, click, what=f"click {css}")


def test_upload_train_watch_the_curve_grow_and_stream_from_the_playground(
    browser, base_url, tmp_path
):
    corpus = tmp_path / "console-corpus.txt"
    corpus.write_text(SMALL_CORPUS[:50_000])
    browser.get(f"{base_url}/#/datasets")
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == ALICE

    # Upload with the progress bar: it ends full and the dataset is offered for a job.
    browser.find_element(By.ID, "upload-file").send_keys(str(corpus))
    browser.find_element(By.ID, "upload-btn").click()
    _wait(browser, lambda d: "uploaded" in _text(d, "#upload-status"), what="upload")
    dataset_id = _text(browser, "#upload-status").split()[-1]
    assert browser.find_element(By.ID, "upload-progress").get_attribute("value") == "1"
    _wait(browser, lambda d: Select(d.find_element(By.ID, "job-dataset")).first_selected_option.get_attribute("value") == dataset_id)  # fmt: skip

    # Start a tiny job that evaluates twice, long enough (a few seconds on a quiet machine)
    # for the page to be seen growing.
    browser.find_element(By.ID, "job-max-steps").send_keys("300")
    browser.find_element(By.ID, "job-eval-interval").send_keys("150")
    browser.find_element(By.ID, "job-name").send_keys("console")
    browser.find_element(By.ID, "job-start").click()
    _wait(browser, lambda d: "#/jobs/job_" in d.current_url, what="job page")
    job_id = browser.current_url.rsplit("/", 1)[1]
    assert _text(browser, "#job-id") == job_id

    # The parameter split and FLOPs come from the job record.
    _wait(browser, lambda d: _text(d, "#flops") != "–")
    parts = {
        row.get_attribute("data-part"): row.text
        for row in browser.find_elements(By.CSS_SELECTOR, "#param-split tr")
    }
    assert set(parts) == {"embedding", "attention", "mlp", "norm", "total"}

    # The loss curve grows while the job trains (events arrive over SSE, no reload).
    seen = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        n = int(_text(browser, "#loss-points") or 0)
        if not seen or n != seen[-1]:
            seen.append(n)
        if _text(browser, "#job-state") == "SUCCEEDED":
            break
        time.sleep(0.05)
    assert _text(browser, "#job-state") == "SUCCEEDED", seen
    growing = [n for n in seen if n > 0]
    assert len(growing) >= 3 and growing == sorted(growing), seen
    line = browser.find_element(By.CSS_SELECTOR, "#loss-chart polyline.train")
    assert int(line.get_attribute("data-points")) == growing[-1]
    assert int(_text(browser, "#val-points")) >= 1
    assert int(_text(browser, "#lr-points")) == growing[-1]

    # The jobs table lists it; the models page shows its version, val loss and files.
    browser.get(f"{base_url}/#/jobs")
    _wait(browser, lambda d: job_id in _text(d, "#jobs-table"), what="jobs table")
    browser.get(f"{base_url}/#/models")
    _wait(browser, lambda d: "model.onnx" in _text(d, "#models-table"), what="models table")

    # The playground streams text and ends with finish reason, usage and timings.
    browser.get(f"{base_url}/#/playground")
    _wait(browser, lambda d: "console@1" in _text(d, "#pg-model"), what="model list")
    Select(browser.find_element(By.ID, "pg-model")).select_by_value("console@1")
    browser.find_element(By.ID, "pg-max-tokens").clear()
    browser.find_element(By.ID, "pg-max-tokens").send_keys(
        "20"
    )  # the tiny preset has a 32-token context
    browser.find_element(By.ID, "pg-go").click()
    _wait(browser, lambda d: _text(d, "#pg-finish") == "length", what="generation")
    output = browser.find_element(By.ID, "pg-output")
    assert len(output.text) > 0 and int(output.get_attribute("data-deltas")) > 1
    assert _text(browser, "#pg-usage").endswith("20 completion tokens")
    assert "tokens/s" in _text(browser, "#pg-timings")
    assert not browser.find_element(By.ID, "error").is_displayed()


def test_jobs_table_filters_by_state_and_cancels_a_running_job(browser, base_url, gateway_api):
    ds = gateway_api.upload(SMALL_CORPUS[:20_000].encode(), name="console-cancel")
    job = gateway_api.create(ds.id, max_steps=100_000, model_name="long")
    try:
        gateway_api.wait_for(job.id, lambda j: j.progress.step > 0)
        browser.get(f"{base_url}/#/jobs")
        Select(browser.find_element(By.ID, "jobs-filter")).select_by_visible_text("RUNNING")
        row = f'#jobs-table[data-state="RUNNING"] tr[data-job="{job.id}"]'
        _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, row), what="running row")
        # Only RUNNING jobs are listed, each with its state in the second column (read in
        # one script call, so a re-render cannot swap the rows mid-read).
        states = browser.execute_script(
            "return [...document.querySelectorAll('#jobs-table tbody tr')]"
            ".map(r => r.cells[1].innerText.trim())"
        )
        assert states and set(states) == {"RUNNING"}
        _click(browser, f"{row} button.cancel")
        done = gateway_api.wait_terminal(job.id, timeout=60)
        assert done.state == 7  # CANCELLED
    finally:  # a failure above must not leave the gateway's one worker busy for later tests
        gateway_api.jobs.CancelJob(
            training_pb2.CancelJobRequest(id=job.id), metadata=gateway_api.metadata
        )
    # The table re-lists after the cancel: the job has left the RUNNING filter.
    _wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, row), what="row gone")
