"""The ticker page in a real Chromium (Debian's, driven by Playwright) reads the exact total."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simulator.publisher import publish_scenario
from simulator.scenario import scenario_for_year
from ticker.shell.mqtt import ReliablePublisher

from .conftest import running_pipeline

pytestmark = pytest.mark.browser
playwright = pytest.importorskip("playwright.async_api")

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]
SCENARIO = scenario_for_year(2020, order_scale=0.0001)


@pytest.fixture
async def page():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/test, which installs chromium")
    async with playwright.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = await browser.new_page(viewport={"width": 1920, "height": 1080})
        errors: list[str] = []
        # Chromium itself logs each refused reconnection attempt while a server is down.
        page.on("console", lambda m: errors.append(m.text) if m.type == "error"
                and not m.text.startswith("WebSocket connection to") else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        yield page
        await browser.close()
        assert errors == []


async def test_page_shows_the_exact_festival_total(mosquitto, topics, page):
    """After a full-speed replay the page shows $74,100,000,000.00 and the final clock."""
    async with running_pipeline(mosquitto, topics) as pipeline:
        await page.goto(pipeline.url)
        await page.wait_for_selector("#status[data-state=live]", timeout=10_000)
        async with ReliablePublisher(mosquitto) as publisher:
            report = await publish_scenario(publisher, SCENARIO, topics, producer="browser",
                                            speed=None)
        gmv = page.locator("#gmv")
        await playwright.expect(gmv).to_have_attribute("data-cents", str(report.gmv_cents),
                                                       timeout=30_000)
        await playwright.expect(gmv).to_have_text("$74,100,000,000.00", timeout=5_000)
        await playwright.expect(page.locator("#clock")).to_have_text("Nov 11 · 23:59")
        await playwright.expect(page.locator("#orders")).to_have_text(f"{report.orders:,}")
        brands = pipeline.state.snapshot()["brands_active"]
        await playwright.expect(page.locator("#brands")).to_have_text(f"{brands:,}")
        top = page.locator("#countries li.row").first
        await playwright.expect(top).to_have_attribute("data-code", "US")
    assert report.gmv_cents == pipeline.state.gmv_cents == SCENARIO.gmv_cents


async def test_page_reconnects_after_the_server_restarts(mosquitto, topics, page):
    """When the ticker server goes away the page says so, and it reconnects by itself; a new
    server that has heard from no aggregator shows as stale ("no data"), never as live."""
    async with running_pipeline(mosquitto, topics) as pipeline:
        await page.goto(pipeline.url)
        status = page.locator("#status")
        await playwright.expect(status).to_have_attribute("data-state", "live", timeout=10_000)
        port = pipeline.port
    await playwright.expect(status).to_have_attribute("data-state", "reconnecting",
                                                      timeout=10_000)
    # A new server on the same port: the page must find it without a reload.
    from ticker.shell.server import TickerServer
    server = TickerServer()
    ws_server = await server.serve("127.0.0.1", port)
    try:
        await playwright.expect(status).to_have_attribute("data-state", "stale", timeout=15_000)
        await playwright.expect(status).to_have_text(re.compile(r"Stale · no data", re.I))
    finally:
        ws_server.close()
        await ws_server.wait_closed()


@contextlib.contextmanager
def demo_process(*options: str):
    """`gmv demo` as a process; yields (url, operator token) from what it prints."""
    proc = subprocess.Popen([sys.executable, "-m", "gmv.cli", "demo", "--port", "0",
                             *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        url = re.search(r"open (http://\S+) ", proc.stdout.readline()).group(1)
        token = re.search(r"\(token: (\S+)\)", proc.stdout.readline()).group(1)
        yield url, token
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=15)


async def test_page_shows_the_2020_festival_figures(page):
    """At the end of the 2020 demo the page shows USD 74.1B, 250,000 brands (31,000 overseas,
    2,600 first-time), 2.11B chatbot queries, the US first and 2019's total passed."""
    with demo_process("--speed", "max") as (url, _):
        await page.goto(url)
        gmv = page.locator("#gmv")
        await playwright.expect(gmv).to_have_attribute("data-cents", "7410000000000",
                                                       timeout=60_000)
        await playwright.expect(gmv).to_have_text("$74,100,000,000.00")
        await playwright.expect(page.locator("#brands")).to_have_text("250,000")
        await playwright.expect(page.locator("#brands-overseas")).to_have_text("31,000")
        await playwright.expect(page.locator("#brands-first-time")).to_have_text("2,600")
        await playwright.expect(page.locator("#chatbot")).to_have_text("2,110,000,000")
        await playwright.expect(page.locator("#countries li.row").first) \
            .to_have_attribute("data-code", "US")
        await playwright.expect(page.locator("#compare")).to_have_attribute("data-pct", "26.0")
        await playwright.expect(page.locator("#passed")).to_contain_text("Passed 2019")
        await playwright.expect(page.locator("#replay")).to_have_attribute("data-state", "done")


async def test_operator_pauses_the_replay_from_the_page_with_the_token(page):
    """?operator=1 with the token pauses the replay; a wrong token is refused and shown."""
    with demo_process("--speed", "60", "--scenario", "2019", "--order-scale", "0.0001") \
            as (url, token):
        await page.goto(url + "?operator=1")
        await playwright.expect(page.locator("#status")).to_have_attribute(
            "data-state", "live", timeout=10_000)
        await page.fill("#operator-token", "wrong")
        await page.click("#operator-pause")
        result = page.locator("#operator-result")
        await playwright.expect(result).to_have_text("bad token")
        await page.fill("#operator-token", token)
        await page.click("#operator-pause")
        await playwright.expect(result).to_have_text(re.compile(r"^paused at 11-11 \d\d:\d\d ✓$"))
        await playwright.expect(page.locator("#replay")).to_have_attribute(
            "data-state", "paused", timeout=10_000)
        # What was published before the pause may still be on its way through the broker
        # and the aggregator (a loaded machine: up to a flow window); once that is in, the
        # total holds.
        gmv, held, deadline = page.locator("#gmv"), None, time.monotonic() + 15
        while (now := await gmv.get_attribute("data-cents")) != held:
            assert time.monotonic() < deadline, "the total never settled after the pause"
            held = now
            await asyncio.sleep(0.5)
        await asyncio.sleep(2.5)
        assert await gmv.get_attribute("data-cents") == held
