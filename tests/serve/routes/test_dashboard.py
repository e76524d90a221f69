"""The dashboard (GET /) in a real headless browser: Debian's chromium driven by Playwright.

The real server trains two users' jobs on a tiny BERT; the page, opened with the first user's
key, must show that user's job, its live loss curve and status, and nothing of the other's; a
paused job in a style of its own, and a job's checkpoints (step, metrics, model name).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import httpx
import pytest
from serve_helpers import REVIEWS, Server, add_user, upload, wait_job

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_bert_dir):
    data = tmp_path_factory.mktemp("dashboard") / "data"
    keys = {name: add_user(data, name) for name in ("alice", "bob")}
    srv = Server(data, [f"bert={tiny_bert_dir}"]).start()
    srv.keys = keys
    yield srv
    srv.stop()


def test_page_and_its_files_are_served_without_a_key(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "/static/dashboard.js" in page.text and "/static/uplot/uPlot.iife.min.js" in page.text
    for name, kind in [("dashboard.js", "text/javascript"), ("uplot/uPlot.iife.min.js", "text/javascript"),
                       ("uplot/uPlot.min.css", "text/css"), ("uplot/LICENSE", "text/plain")]:
        r = httpx.get(f"{server.url}/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind) and r.content, name
    assert "MIT License" in httpx.get(server.url + "/static/uplot/LICENSE").text
    for name in ("index.html", "../api.py", "..%2Fapi.py", "uplot"):  # only the listed files
        assert httpx.get(f"{server.url}/static/{name}").status_code == 404, name


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is missing (apt-get install chromium)")
def test_dashboard_shows_only_the_key_holders_jobs_live(server):
    from playwright.sync_api import expect, sync_playwright

    alice, bob = (server.client(server.keys[n]) for n in ("alice", "bob"))
    bob_job = bob.fine_tuning.jobs.create(model="bert", training_file=upload(bob, REVIEWS).id,
                                          hyperparameters={"n_epochs": 2, "batch_size": 4})
    train, valid = upload(alice, REVIEWS * 2, "train.jsonl"), upload(alice, REVIEWS, "valid.jsonl")
    job = alice.fine_tuning.jobs.create(model="bert", training_file=train.id, validation_file=valid.id,
                                        hyperparameters={"n_epochs": 8, "batch_size": 4,
                                                         "learning_rate_multiplier": 10})
    screenshot = Path(os.environ.get("COLAFT_DASHBOARD_SCREENSHOT")
                      or Path(tempfile.gettempdir()) / "colaft-dashboard.png")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            page.goto(server.url + "/")
            expect(page.locator("#hint")).to_be_visible()
            page.fill("#key", server.keys["alice"])
            page.click("button[type=submit]")

            row = page.locator(f"tr[data-job='{job.id}']")
            expect(row).to_be_visible()
            first = row.locator(".status").inner_text()
            expect(row).to_contain_text("bert")
            POINTS = "id => window.colaftDashboard.points(id)"  # functions, not strings: the page's CSP has no eval
            page.wait_for_function(f"id => ({POINTS})(id).length >= 1", arg=job.id, polling=100)
            early = len(page.evaluate(POINTS, job.id))  # the curve has points while the job is still training
            status_then = row.locator(".status").inner_text()
            assert first in ("queued", "running") and status_then in ("running", "succeeded")
            # the page follows the job to its end without a reload
            expect(row.locator(".status")).to_have_text("succeeded", timeout=60_000)
            done = wait_job(alice, job.id, 30)
            assert done.status == "succeeded"
            expect(page.locator("#validation")).to_contain_text("Validation at step")
            page.wait_for_function("() => Number(document.querySelector('#chart').dataset.points) >= 2", polling=100)
            points = page.evaluate(POINTS, job.id)
            steps = [e.data["step"] for e in alice.fine_tuning.jobs.list_events(job.id, limit=1000).data
                     if e.type == "metrics" and e.data and "train_loss" in e.data]
            assert [s for s, _ in points] == sorted(steps)
            # the curve grew after the first look, unless the job had already ended by then (a
            # busy machine): its status, seen changing without a reload above, shows the updates
            assert len(points) > early or status_then == "succeeded"
            assert page.locator("#chart canvas").count() >= 1  # uPlot drew it
            expect(page.locator(".u-legend")).to_contain_text("validation loss")
            expect(page.locator("#events")).to_contain_text("The job has successfully completed")
            page.screenshot(path=str(screenshot), full_page=True)

            # only alice's jobs, ever; the key stays in the tab's storage, out of the URL
            wait_job(bob, bob_job.id, 30)
            page.wait_for_timeout(2500)  # one more refresh after bob's job ended
            html = page.content()
            assert job.id in html and bob_job.id not in html
            events = page.evaluate("() => JSON.stringify([...window.colaftDashboard.state.events.keys()])")
            assert bob_job.id not in events
            key = server.keys["alice"]
            assert key not in page.url and key not in html
            assert page.evaluate("() => sessionStorage.getItem('colaft.apiKey')") == server.keys["alice"]

            # a wrong key: a clear error, and the jobs shown before are gone
            page.fill("#key", "sk-not-a-key")
            page.click("button[type=submit]")
            expect(page.locator("#error")).to_contain_text("This API key was not accepted (401)")
            assert job.id not in page.content()
            assert page.evaluate("() => sessionStorage.getItem('colaft.apiKey')") is None
        finally:
            browser.close()
    assert server.keys["alice"] not in server.log_text()
    print(f"\ndashboard screenshot: {screenshot}")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is missing (apt-get install chromium)")
def test_dashboard_shows_paused_jobs_and_a_jobs_checkpoints(server):
    from playwright.sync_api import expect, sync_playwright

    alice = server.client(server.keys["alice"])
    done = alice.fine_tuning.jobs.create(model="bert", training_file=upload(alice, REVIEWS, "short.jsonl").id,
                                         hyperparameters={"n_epochs": 3, "batch_size": 4})  # 12 steps
    done = wait_job(alice, done.id)
    assert done.status == "succeeded", done.error
    long = alice.fine_tuning.jobs.create(model="bert", training_file=upload(alice, REVIEWS, "long.jsonl").id,
                                         hyperparameters={"n_epochs": 50, "batch_size": 1})  # 800 steps
    wait_job(alice, long.id, 60, until=("running",))
    with server.http(server.keys["alice"]) as h:
        assert h.post(f"/v1/fine_tuning/jobs/{long.id}/pause").json()["status"] == "paused"

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            page.goto(server.url + "/")
            page.fill("#key", server.keys["alice"])
            page.click("button[type=submit]")

            status = page.locator(f"tr[data-job='{long.id}'] .status")
            expect(status).to_have_text("paused")
            expect(status).to_have_class("status paused")
            colors = "e => [getComputedStyle(e).color, getComputedStyle(e).backgroundColor]"
            assert status.evaluate(colors) == ["rgb(130, 80, 223)", "rgb(251, 239, 255)"]  # its own style
            done_status = page.locator(f"tr[data-job='{done.id}'] .status")
            assert done_status.evaluate(colors) != status.evaluate(colors)

            page.click(f"tr[data-job='{done.id}']")  # its checkpoints, newest first, each a model
            rows = page.locator("#checkpoints tr")
            expect(rows).to_have_count(3)
            assert [rows.nth(i).locator("td").first.inner_text() for i in range(3)] == ["12", "8", "4"]
            expect(rows.first).to_contain_text(f"{done.fine_tuned_model}:ckpt-step-12")
            expect(rows.first).to_contain_text("train_loss")
            expect(page.locator("#no-checkpoints")).to_be_hidden()

            with server.http(server.keys["alice"]) as h:  # the page follows the resume without a reload
                assert h.post(f"/v1/fine_tuning/jobs/{long.id}/resume").status_code == 200
            expect(status).to_have_text("running")
            page.click(f"tr[data-job='{long.id}']")
            expect(page.locator("#no-checkpoints")).to_be_visible()  # none listed before its last epochs
        finally:
            browser.close()
            alice.fine_tuning.jobs.cancel(long.id)
