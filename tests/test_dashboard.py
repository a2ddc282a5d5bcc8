"""The status page: its pure state (fast), and the page itself in a real headless Chromium
(Debian's `chromium` + `chromium-driver`, driven by Selenium) against a running stack: it
shows both workers and the router's decisions, and drops a worker that leaves.

The browser test installs Chromium with apt-get when it is missing (as CI needs; bounded in
time) and skips, saying why, only when it cannot. Set GENSET_DASHBOARD_SCREENSHOT=path to keep
the page's screenshot (docs/dashboard.png comes from such a run).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

import proto
from services.frontend.dashboard import DashboardState, TrafficSeries
from tests.stack import Stack

KEY = "dash-key"


# -- the pure state ----------------------------------------------------------------------------


def _registry(*cards: proto.ModelCard) -> SimpleNamespace:
    models: dict = {}
    for card in cards:
        models.setdefault(card.model, SimpleNamespace(cards={})).cards[card.instance_id] = card
    return SimpleNamespace(models=models)


def _card(wid: int, role: str = "decode", model: str = "m") -> proto.ModelCard:
    return proto.ModelCard(model=model, instance_id=wid, role=role, engine="mocker",
                           block_size=16, kv_blocks=100)


def test_state_workers_reports_and_decisions():
    reg = _registry(_card(0xA), _card(0xB), _card(0xC, role="prefill"))
    st = DashboardState(reg, "ns")
    st.on_load_report(proto.LoadReport(worker_id=0xA, ts_ms=1, running=3, kv_used_blocks=40,
                                       kv_total_blocks=100), now_s=10.0)
    st.on_load_report(proto.LoadReport(worker_id=0xDEAD, ts_ms=1), now_s=10.0)  # no card
    st.on_decision(proto.RouteDecision(request_id="r1", worker_id=0xA, model="m",
                                       overlap_blocks=2, prompt_tokens=64, policy="genset"), 10.0)
    st.on_decision(proto.RouteDecision(request_id="r2", worker_id=0xA, model="m",
                                       overlap_blocks=0, prompt_tokens=64, policy="genset"), 11.0)
    st.on_decision(proto.RouteDecision(request_id="x", worker_id=0xDEAD, model="m"), 11.0)
    snap = st.snapshot(12.0)
    workers = {w["id"]: w for w in snap["workers"]}
    assert set(workers) == {"a", "b", "c"} and 0xDEAD not in st.workers
    a = workers["a"]
    assert a["kv_use"] == 0.4 and a["running"] == 3 and a["report_age_s"] == 2.0
    assert a["routed"] == 2 and a["hit_rate"] == 32 / 128
    assert workers["b"]["kv_use"] is None and workers["b"]["hit_rate"] is None
    assert snap["pools"] == {"decode": 2, "prefill": 1}
    assert [d["request_id"] for d in snap["decisions"]] == ["r2", "r1"]
    # a worker whose card goes disappears, with its stats
    del reg.models["m"].cards[0xA]
    assert {w["id"] for w in st.snapshot(13.0)["workers"]} == {"b", "c"}
    assert 0xA not in st.workers


def test_traffic_series_is_per_second_deltas_and_bounded():
    series = TrafficSeries(size=3)
    zero = dict.fromkeys(("requests", "ttft_sum", "ttft_count", "itl_sum", "itl_count",
                          "output_tokens", "prompt_tokens", "cached_tokens"), 0.0)
    series.observe(100.0, zero)
    series.observe(101.0, {**zero, "requests": 4, "ttft_sum": 0.4, "ttft_count": 4,
                           "output_tokens": 40})
    series.observe(102.0, {**zero, "requests": 4, "ttft_sum": 0.4, "ttft_count": 4,
                           "output_tokens": 40})
    s = series.series()
    assert s["requests_per_s"] == [4.0, 0.0] and s["output_tokens_per_s"] == [40.0, 0.0]
    assert s["ttft_ms"][0] == pytest.approx(100.0) and s["ttft_ms"][1] is None
    for t in range(103, 110):
        series.observe(float(t), zero)  # counters reset: counted from zero, not negative
    assert len(series.series()["t"]) == 3
    assert min(series.series()["requests_per_s"]) >= 0


# -- a running stack ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def stack(nats_server, etcd_server, tmp_path_factory):
    async with Stack(nats_server.url, etcd_server.endpoint,
                     log_dir=tmp_path_factory.mktemp("dashboard")) as st:
        await st.start_workers(2, engine="mocker", extra_args=["--speedup", "10"])
        # ready = /health answers (its /v1/models check would need the key)
        st.frontend = await st.start_frontend(models=[], extra_args=["--api-key", KEY])

        async def model_listed() -> bool:
            async with httpx.AsyncClient(timeout=5) as http:
                r = await http.get(st.frontend.url + "/v1/models",
                                   headers={"Authorization": f"Bearer {KEY}"})
            return [m["id"] for m in r.json()["data"]] == ["tiny"]

        await st.frontend.wait_until(model_listed, "serving tiny", 60)
        yield st


async def _traffic(url: str, n: int) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers) as http:
        for i in range(n):
            r = await http.post("/v1/chat/completions", json={
                "model": "tiny", "max_tokens": 8,
                "messages": [{"role": "system", "content": "You are a helpful assistant. " * 8},
                             {"role": "user", "content": f"question {i}"}]})
            assert r.status_code == 200, r.text


@pytest.mark.slow
async def test_state_endpoint_and_static_files(stack):
    url = stack.frontend.url
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        assert (await http.get("/dashboard/state")).status_code == 401  # follows the API key
        r = await http.get("/", follow_redirects=False)
        assert r.status_code == 307 and r.headers["location"] == "/dashboard"
        page = await http.get("/dashboard")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert (await http.get("/dashboard/app.js")).status_code == 200
        assert (await http.get("/dashboard/../pyproject.toml")).status_code == 404
        assert (await http.get("/dashboard/nothing.js")).status_code == 404
        await _traffic(url, 3)
        headers = {"Authorization": f"Bearer {KEY}"}
        deadline = time.monotonic() + 30
        while True:
            state = (await http.get("/dashboard/state", headers=headers)).json()
            routed = sum(w["routed"] for w in state["workers"])
            if routed >= 3 and any(w["kv_use"] is not None for w in state["workers"]) and \
                    state["totals"]["requests"] >= 3 and state["series"]["t"]:
                break
            assert time.monotonic() < deadline, state
            await asyncio.sleep(0.2)
    assert {w["id"] for w in state["workers"]} == {f"{w.instance_id:x}" for w in stack.workers}
    assert all(w["role"] == "decode" and w["engine"] == "mocker" for w in state["workers"])
    assert state["models"] == ["tiny"] and state["pools"] == {"decode": 2}
    assert len(state["decisions"]) >= 3 and state["planner"] is None


# -- the page in a real browser ----------------------------------------------------------------


def _browser() -> tuple[str, str]:
    """Paths of chromium and chromedriver; installs Debian's packages when missing."""
    def find() -> tuple[str | None, str | None]:
        return (shutil.which("chromium") or shutil.which("chromium-browser"),
                shutil.which("chromedriver"))

    chromium, driver = find()
    if chromium and driver:
        return chromium, driver
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("no chromium / chromedriver, and apt-get cannot install them here "
                    "(needs root): install Debian's chromium and chromium-driver")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium",
           "chromium-driver"]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
        if done.returncode != 0:  # a stale package list: refresh once and retry
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True,
                           timeout=120)
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    except subprocess.TimeoutExpired:
        pytest.skip("installing chromium with apt-get took too long")
    chromium, driver = find()
    if not (chromium and driver):
        pytest.skip(f"apt-get could not install chromium: {done.stderr[-500:]}")
    return chromium, driver


def _open_browser(chromium: str, driver_path: str):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1440,1000", "--hide-scrollbars"):
        options.add_argument(arg)
    # the driver path is given: Selenium downloads nothing
    return webdriver.Chrome(service=Service(executable_path=driver_path), options=options)


def _rows(driver, selector: str) -> list[str]:
    # One script reads every row: the page re-renders its tables between WebDriver calls, and
    # rows found by one call and read by the next went stale (a CI failure); a script runs
    # between two of the page's own tasks, so it sees one rendering whole.
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]),"
        " e => e.getAttribute('data-worker-id') || e.getAttribute('data-request-id'));",
        selector)


async def _wait(driver, what: str, check, wait_s: float = 60.0):
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + wait_s
    while True:
        try:
            value = await asyncio.to_thread(check, driver)
        except StaleElementReferenceException:
            value = None  # read while the page replaced it: look again
        if value:
            return value
        if time.monotonic() > deadline:
            status = await asyncio.to_thread(
                lambda: driver.find_element("id", "status").text)
            raise AssertionError(f"page never showed {what} (status line: {status!r})")
        await asyncio.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_page_in_a_real_browser(stack, tmp_path):
    chromium, driver_path = await asyncio.to_thread(_browser)
    driver = await asyncio.to_thread(_open_browser, chromium, driver_path)
    try:
        await _traffic(stack.frontend.url, 6)
        # the key rides in the fragment: the page moves it to sessionStorage
        await asyncio.to_thread(driver.get, stack.frontend.url + f"/#key={KEY}")
        ids = sorted(f"{w.instance_id:x}" for w in stack.workers)
        shown = await _wait(driver, "both workers", lambda d: sorted(
            _rows(d, "#workers tr[data-worker-id]")) == ids)
        assert shown
        await _wait(driver, "router decisions", lambda d: len(
            _rows(d, "#decisions tr[data-request-id]")) >= 6)
        await _wait(driver, "the key gone from the address bar",
                    lambda d: "key=" not in d.current_url)
        await _traffic(stack.frontend.url, 6)
        await _wait(driver, "a requests/s value", lambda d: d.find_element(
            "id", "rps-now").text not in ("", "\u2013"))
        shot = Path(os.environ.get("GENSET_DASHBOARD_SCREENSHOT") or tmp_path / "dashboard.png")
        assert await asyncio.to_thread(driver.save_screenshot, str(shot))

        leaving, staying = stack.workers[0], stack.workers[1]
        await leaving.stop()  # SIGTERM: its lease is revoked, its card leaves etcd
        await _wait(driver, "one worker left", lambda d: _rows(
            d, "#workers tr[data-worker-id]") == [f"{staying.instance_id:x}"])
        await _wait(driver, "a worker count of 1", lambda d: d.find_element(
            "id", "worker-count").text == "1")
    finally:
        await asyncio.to_thread(driver.quit)
