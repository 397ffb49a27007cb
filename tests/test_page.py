"""The ticker page as a live broadcast, in a real Chromium against real parts: the counter's
motion, honest LIVE / STALE / REPLAY badges, no $0.00 on a reload, the festival's story
(milestones, RMB), kiosk mode, sizes and an idle page that runs nothing.

Every test drives a real `gmv demo` process or a real aggregator and ticker server on the
session's Mosquitto, fed by a real publisher; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import orjson
import pytest

from simulator.scenario import scenario_for_year
from ticker.shell.aggregator import Aggregator
from ticker.core.dimensions import FESTIVAL_2020
from ticker.core.partitions import Shard
from ticker.shell.mqtt import BrokerSettings, ReliablePublisher, Topics, watch_totals
from ticker.shell.server import TickerServer
from ticker.core.wire import OrderBatch, encode

from . import test_browser
from .conftest import festival_limits
from .test_browser import demo_process

page = test_browser.page  # the same fixture: a Chromium page that fails on console errors

pytestmark = pytest.mark.browser
playwright = pytest.importorskip("playwright.async_api")
expect = playwright.expect


# ---------- helpers ----------

def api_totals(url: str) -> dict:
    with urllib.request.urlopen(url + "api/totals", timeout=5) as answer:
        return json.load(answer)


def wait_until_done(url: str, timeout: float = 90.0) -> dict:
    """The demo's view once its replay has published everything (USD 74.1B in)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = api_totals(url)
        if view["gmv_cents"] == 7_410_000_000_000 and (view.get("replay") or {}).get(
                "state") == "done":
            return view
        time.sleep(0.25)
    raise TimeoutError(f"the demo at {url} did not finish within {timeout} s")


@pytest.fixture(scope="module")
def finished_demo() -> Iterator[str]:
    """A `gmv demo --speed max` whose 2020 replay has finished (order scale 0.0001: quick);
    yields its URL. Shared by the tests that look at the finished screen."""
    with demo_process("--speed", "max", "--order-scale", "0.0001") as (url, _):
        wait_until_done(url)
        yield url


def press(seconds: int) -> str:
    """Elapsed time as the page must write it: 48 s, 1 min 8 s, 1 h 3 min, 10 d 0 h 8 min."""
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds // 60 % 60} min"
    return f"{seconds // 86400} d {seconds // 3600 % 24} h {seconds // 60 % 60} min"


def cents_of(text: str) -> int:
    """"$74,100,000,000.00" -> 7410000000000."""
    return int(re.sub(r"[^\d]", "", text))


def compact(cents: int, sym: str = "$") -> str:
    """The page's compact figure: floor to hundredths of the largest unit (T, B, M, K)."""
    for unit, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if cents >= unit * 100:
            h = cents // unit
            return f"{sym}{h // 100:,}.{h % 100:02d}{suffix}"
    return f"{sym}{cents // 100:,}.{cents % 100:02d}"


def batch(producer: str, seq: int, minute: int, amounts: list[int]) -> OrderBatch:
    n = len(amounts)
    return OrderBatch(producer, seq, minute, np.array(amounts, np.int64),
                      np.arange(n, dtype=np.uint32) + 1000, np.zeros(n, np.uint8),
                      np.zeros(n, np.uint8))


@contextlib.asynccontextmanager
async def parts(broker: BrokerSettings, topics: Topics) -> AsyncIterator[tuple]:
    """An aggregator (its task, so a test can stop it) and a ticker server in this loop;
    yields (url, aggregator task)."""
    aggregator = Aggregator(broker, topics, festival_limits(), FESTIVAL_2020,
                            totals_interval=0.05)
    server = TickerServer(push_hz=20)
    ready = asyncio.Event()
    agg_task = asyncio.create_task(aggregator.run())
    tasks = [agg_task, asyncio.create_task(watch_totals(broker, topics, server.receive_message,
                                                        ready=ready)),
             asyncio.create_task(server.run_pusher())]
    ws_server = await server.serve("127.0.0.1", 0)
    try:
        async with asyncio.timeout(10):
            await aggregator.ready.wait()
            await ready.wait()
        yield f"http://127.0.0.1:{ws_server.sockets[0].getsockname()[1]}/", agg_task
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        ws_server.close()
        await ws_server.wait_closed()


# Samples the big counter and the compact "this year" figure every 100 ms, in the page.
SAMPLER = """() => { window.samples = []; window.sampler = setInterval(() => {
  window.samples.push([performance.now(), document.querySelector('#gmv').textContent,
                       document.querySelector('#race-now').textContent]); }, 100); }"""

# Records every text the big counter and the milestone banner ever show, from the first paint.
RECORDER = """
window.painted = []; window.banners = [];
new MutationObserver(() => {
  const gmv = document.querySelector('#gmv');
  if (gmv) { const t = gmv.textContent; if (window.painted.at(-1) !== t) window.painted.push(t); }
  const b = document.querySelector('#banner');
  if (b && !b.hidden) { const t = b.textContent.replace(/\\s+/g, ' ').trim();
    if (window.banners.at(-1) !== t) window.banners.push(t); }
}).observe(document, { subtree: true, childList: true, characterData: true, attributes: true });
"""


# ---------- 1. continuous motion, one displayed value ----------

@pytest.mark.slow
async def test_counter_moves_several_times_a_second_never_backwards_one_value_everywhere(
        mosquitto, topics, page):
    """With totals arriving 5 times a second, the counter sampled every 100 ms changes at
    least 4 times a second, never decreases, never passes the total received, lands on the
    exact final total, and the compact "this year" figure always shows the same value."""
    async with parts(mosquitto, topics) as (url, _):
        await page.goto(url)
        await expect(page.locator("#status")).to_have_attribute("data-state", "live",
                                                                timeout=10_000)
        total = 0
        async with ReliablePublisher(mosquitto) as publisher:
            await publisher.send(topics.orders("p"), encode(batch("p", 0, 14400, [50_000_00])))
            total += 50_000_00
            await expect(page.locator("#gmv")).to_have_attribute("data-cents", str(total))
            await page.evaluate(SAMPLER)
            loop = asyncio.get_running_loop()
            start = loop.time()
            for seq in range(1, 21):  # 4 s, a batch every 200 ms, like sub-minute batches
                amounts = [1_234_567 + seq * 1_001, 2_345_678]
                await publisher.send(topics.orders("p"),
                                     encode(batch("p", seq, 14400 + seq // 5, amounts)))
                total += sum(amounts)
                await asyncio.sleep(max(0.0, start + seq * 0.2 - loop.time()))
            await publisher.flush()
        await expect(page.locator("#gmv")).to_have_attribute("data-cents", str(total))
        await expect(page.locator("#gmv")).to_have_text(f"${total // 100:,}.{total % 100:02d}")
        samples = await page.evaluate("clearInterval(window.sampler), window.samples")
    values = [cents_of(text) for _, text, _ in samples]
    assert all(b >= a for a, b in zip(values, values[1:])), "the counter went backwards"
    assert max(values) <= total
    # One displayed value: the compact figure is the big counter's, sample by sample.
    mismatched = [(big, small) for _, big, small in samples if compact(cents_of(big)) != small]
    assert mismatched == []
    # Motion: over the 4 s of totals, a change in most samples (>= 4 changes a second).
    ms = [t for t, _, _ in samples]
    window = [v for t, v in zip(ms, values) if t <= ms[0] + 4000]
    changes = sum(1 for a, b in zip(window, window[1:]) if b != a)
    assert changes >= 16, f"{changes} changes in 4 s of samples"


@pytest.mark.slow
async def test_at_real_time_the_counter_runs_between_the_replays_slices(page):
    """`gmv demo --speed 1 --from "11-11 00:00"`: at real time the counter sampled every
    100 ms moves at least 4 times a second, never decreases, and the compact "this year"
    figure shows the same value sample by sample (before, the counter sat still for 60 s and
    jumped a minute's worth at each minute boundary)."""
    with demo_process("--speed", "1", "--from", "11-11 00:00", "--order-scale", "0.0001") \
            as (url, _):
        await page.goto(url)
        replay = page.locator("#replay")
        await expect(replay).to_have_attribute("data-state", "playing", timeout=30_000)
        await expect(replay).to_have_text(re.compile(r"▶\s*1×"))
        await expect(page.locator("#clock")).to_contain_text("Nov 11 · 00:0")
        await page.evaluate(SAMPLER)
        await asyncio.sleep(4.2)
        samples = await page.evaluate("clearInterval(window.sampler), window.samples")
        received = int(await page.locator("#gmv").get_attribute("data-cents"))
    values = [cents_of(text) for _, text, _ in samples]
    assert all(b >= a for a, b in zip(values, values[1:])), "the counter went backwards"
    assert values[-1] <= received
    assert [(big, small) for _, big, small in samples if compact(cents_of(big)) != small] == []
    changes = sum(1 for a, b in zip(values, values[1:]) if b != a)
    assert changes >= 16, f"{changes} changes in {len(values)} samples over 4 s"


async def test_the_replay_badge_tells_playing_paused_seeking_and_done(mosquitto, topics, page):
    """The REPLAY badge reads what the replay says: "▶ 1584×", "▶ max", "▶ 0.004×" (not
    "▶ 0×", as at any speed under 0.005), "▶ 1e+300×" (not "▶ Infinity×"), "❚❚ paused",
    "⏩ seeking", "■ done", and is hidden when there is no replay status."""
    async with parts(mosquitto, topics) as (url, _):
        async with ReliablePublisher(mosquitto) as publisher:
            await publisher.send(topics.orders("p"), encode(batch("p", 0, 100, [99_00])))
            await page.goto(url)
            replay = page.locator("#replay")
            await expect(page.locator("#status")).to_have_attribute("data-state", "live",
                                                                    timeout=10_000)
            await expect(replay).to_be_hidden()
            for state, speed, text in [("playing", 1584, r"▶\s*1584×"),
                                       ("playing", None, r"▶\s*max"),
                                       # slower than real time: not "0×" (a stall)
                                       ("playing", 0.004, r"▶\s*0\.004×"),
                                       # huge but valid: not "Infinity×"
                                       ("playing", 2.6e7, r"▶\s*2\.6e\+7×"),
                                       ("playing", 1e300, r"▶\s*1e\+300×"),
                                       ("paused", 1584, r"❚❚\s*paused"),
                                       ("seeking", 1584, r"seeking"),
                                       ("done", 1584, r"■\s*done")]:
                await publisher.send(topics.replay, orjson.dumps(
                    {"v": 1, "state": state, "speed": speed, "minute": 100,
                     "scenario": "2020", "loop": False}))
                await expect(replay).to_have_attribute("data-state", state)
                await expect(replay).to_have_text(re.compile(text))
            await publisher.send(topics.replay, b"")
            await expect(replay).to_be_hidden(timeout=7_000)


async def test_a_drop_is_shown_at_once_never_counted_down(mosquitto, topics, page):
    """When the total falls (an aggregator starting over, a reset, a seek back) the counter
    goes straight to the new total: no figure in between, no counting backwards."""
    await page.add_init_script(RECORDER)
    async with parts(mosquitto, topics) as (url, agg_task):
        async with ReliablePublisher(mosquitto) as publisher:
            await publisher.send(topics.orders("p"), encode(batch("p", 0, 14400, [9_876_543_21])))
            await page.goto(url)
            await expect(page.locator("#gmv")).to_have_text("$9,876,543.21", timeout=10_000)
            agg_task.cancel()
            await asyncio.gather(agg_task, return_exceptions=True)
            # A new aggregator, in memory: it starts over from zero, then takes one batch.
            fresh = Aggregator(mosquitto, topics, festival_limits(), FESTIVAL_2020,
                               totals_interval=0.05)
            task = asyncio.create_task(fresh.run())
            try:
                async with asyncio.timeout(10):
                    await fresh.ready.wait()
                await publisher.send(topics.orders("q"), encode(batch("q", 0, 14401, [12_34])))
                await expect(page.locator("#gmv")).to_have_text("$12.34", timeout=10_000)
                await asyncio.sleep(0.5)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        painted = [t for t in await page.evaluate("window.painted") if re.search(r"\d", t)]
    big = painted.index("$9,876,543.21")
    after = painted[big:]
    # Straight down: nothing between the old total and the new one (the fresh aggregator's
    # empty totals may show first, then the counter runs up to $12.34 as for any rise).
    assert after[-1] == "$12.34" and all(cents_of(t) <= 12_34 for t in after[1:]), painted


async def test_without_reference_data_the_first_time_figure_is_hidden_not_0(mosquitto, topics,
                                                                           page):
    """An aggregator without a reference file cannot know which brands are first-time: its
    totals say null and the page hides that figure (never "0 first-time overseas"), while
    the overseas count, from the orders' own country column, shows."""
    async with parts(mosquitto, topics) as (url, _):
        abroad = batch("p", 0, 100, [5_00, 7_00, 9_00])
        abroad = dataclasses.replace(abroad, country=np.array([0, 1, 2], np.uint8))
        async with ReliablePublisher(mosquitto) as publisher:
            await publisher.send(topics.orders("p"), encode(abroad))
            await page.goto(url)
            await expect(page.locator("#brands")).to_have_text("3", timeout=10_000)
        await expect(page.locator("#brands-overseas")).to_have_text("2")
        await expect(page.locator("#brands-first-time-part")).to_be_hidden()
        sub = page.locator(".kpi-sub", has=page.locator("#brands-overseas"))
        await expect(sub).to_have_text("2 overseas", use_inner_text=True)


# ---------- 2. honest state ----------

@pytest.mark.slow
async def test_live_turns_stale_within_6_s_when_the_aggregator_stops_while_a_replay_plays(
        mosquitto, topics, page):
    """LIVE while the aggregator runs; once it stops, STALE with its age within about 6 s,
    although replay status updates still arrive; the REPLAY badge says "▶ 1584×" meanwhile
    and disappears when the replay's status is cleared."""
    async with parts(mosquitto, topics) as (url, agg_task):
        async with ReliablePublisher(mosquitto) as publisher:
            async def status(minute: int) -> None:
                await publisher.send(topics.replay, orjson.dumps(
                    {"v": 1, "state": "playing", "speed": 1584, "minute": minute,
                     "scenario": "2020", "loop": False}), retain=True)

            await publisher.send(topics.orders("p"), encode(batch("p", 0, 100, [99_00])))
            await status(100)
            await page.goto(url)
            badge, replay = page.locator("#status"), page.locator("#replay")
            await expect(badge).to_have_attribute("data-state", "live", timeout=10_000)
            await expect(replay).to_have_text(re.compile(r"▶\s*1584×"))
            agg_task.cancel()
            await asyncio.gather(agg_task, return_exceptions=True)
            stopped = time.monotonic()
            stale_at = None
            for minute in range(101, 129):  # status updates every 250 ms for 7 s
                await status(minute)
                if stale_at is None and await badge.get_attribute("data-state") == "stale":
                    stale_at = time.monotonic() - stopped
                await asyncio.sleep(0.25)
            assert stale_at is not None and stale_at <= 6.5, f"stale after {stale_at} s"
            await expect(badge).to_have_text(re.compile(r"Stale · \d+ s", re.I))
            await expect(replay).to_be_visible()
            await publisher.send(topics.replay, b"", retain=True)
            await expect(replay).to_be_hidden(timeout=5_000)


@pytest.mark.slow
async def test_a_quiet_shard_turns_live_into_partial(mosquitto, topics, page):
    """With two aggregator shards expected, LIVE while both report; when shard 1 stops while
    shard 0 goes on, the badge reads "Partial · shard 1 quiet" (part of the total is not
    moving), whatever the other shard's fresh totals say; a shard 1 back with another
    partitioning keeps it Partial, saying so."""
    shards = [Aggregator(mosquitto, topics, festival_limits(), FESTIVAL_2020,
                         shard=Shard(k, 2, 2), totals_interval=0.05) for k in range(2)]
    server = TickerServer(push_hz=20, expected_shards=2)
    ready = asyncio.Event()
    agg_tasks = [asyncio.create_task(a.run()) for a in shards]
    tasks = [*agg_tasks, asyncio.create_task(watch_totals(mosquitto, topics,
                                                          server.receive_message, ready=ready)),
             asyncio.create_task(server.run_pusher())]
    ws_server = await server.serve("127.0.0.1", 0)
    try:
        async with asyncio.timeout(10):
            for a in shards:
                await a.ready.wait()
            await ready.wait()
        await page.goto(f"http://127.0.0.1:{ws_server.sockets[0].getsockname()[1]}/")
        badge = page.locator("#status")
        await expect(badge).to_have_attribute("data-state", "live", timeout=10_000)
        agg_tasks[1].cancel()
        await asyncio.gather(agg_tasks[1], return_exceptions=True)
        await expect(badge).to_have_attribute("data-state", "partial", timeout=10_000)
        await expect(badge).to_have_text(re.compile(r"Partial · shard 1 quiet", re.I))
        wrong = Aggregator(mosquitto, topics, festival_limits(), FESTIVAL_2020,
                           shard=Shard(1, 2, 4), totals_interval=0.05)
        tasks.append(asyncio.create_task(wrong.run()))
        await expect(badge).to_have_text(re.compile(
            r"Partial · shards disagree on the partitions: 2, 4", re.I), timeout=10_000)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        ws_server.close()
        await ws_server.wait_closed()


async def test_a_reload_paints_the_exact_total_first_never_0(finished_demo, page):
    """From the very first paint after a reload, the counter shows only the exact total:
    never $0.00 and no count-up."""
    await page.add_init_script(RECORDER)
    for _ in range(2):  # a first visit and a reload
        await page.goto(finished_demo)
        await expect(page.locator("#gmv")).to_have_text("$74,100,000,000.00")
        await asyncio.sleep(0.5)
        painted = await page.evaluate("window.painted")
        figures = [t for t in painted if re.search(r"\d", t)]
        assert figures == ["$74,100,000,000.00"], painted


# ---------- 4. the story ----------

@pytest.mark.slow
async def test_milestone_banners_and_press_elapsed_times_after_a_max_speed_demo(page):
    """During a `--speed max` 2020 demo milestone banners appear ("USD 1B in 2 min 34 s"); at
    the end the list holds every USD, brands and passed milestone with its elapsed time as
    the press writes it and its wall time, and no RMB one on the USD view."""
    await page.add_init_script(RECORDER)
    with demo_process("--speed", "max", "--order-scale", "0.0001") as (url, _):
        await page.goto(url)
        view = await asyncio.to_thread(wait_until_done, url)
        await asyncio.sleep(0.5)
        banners = await page.evaluate("window.banners")
        milestones = view["milestones"]
        rows = page.locator("#milestones li")
        shown = [m for m in milestones if m["kind"] != "gmv" or m["currency"] == "USD"]
        await expect(rows).to_have_count(min(12, len(shown)))
        texts = [re.sub(r"\s+", " ", t) for t in await rows.all_text_contents()]
    assert any(m["key"] == "usd-1b" for m in milestones)
    assert banners, "no milestone banner was shown"
    assert all(re.search(r" in \d+ (s|min|h|d)\b", b) for b in banners), banners
    labels = {m["label"] for m in milestones}
    assert all(any(label in b for label in labels) for b in banners), banners
    # Newest first; each row: label, "in <elapsed>", and its wall time.
    for m, text in zip(reversed(shown), texts):
        assert m["label"] in text and f"in {press(m['elapsed_s'])}" in text, (m, text)
        hhmm = m["at"][11:16]
        assert hhmm in text, (m, text)
    assert not any(m["currency"] == "RMB" and m["label"] in " ".join(texts)
                   for m in milestones if m["kind"] == "gmv")


async def test_no_comparison_percentage_while_last_year_had_barely_begun(page):
    """Early on Nov 1, when last year's figure at the same time is under 5% of its total
    (the feed says `meaningful: false`), the page shows no "+3743.1%": no percentage at all,
    while the figures themselves stay."""
    with demo_process("--speed", "60", "--order-scale", "0.0001") as (url, _):
        await page.goto(url)
        await expect(page.locator("#replay")).to_have_attribute("data-state", "playing",
                                                                timeout=30_000)
        await expect(page.locator("#clock")).to_contain_text("Nov 1 ·")
        view = api_totals(url)
        assert view["compare"]["meaningful"] is False
        await expect(page.locator("#compare")).to_be_hidden()
        await expect(page.locator("#compare")).to_have_attribute("data-pct", "")
        await expect(page.locator("#race-then")).to_have_text(re.compile(r"^\$[\d,.]+[KMB]?$"))


async def test_rmb_view_shows_exact_rmb_from_the_stated_rate(finished_demo, page):
    """?currency=rmb: the total is USD cents × the feed's decimal rate, rounded half up to
    the fen, exactly; the rate is stated on screen; RMB milestones replace the USD ones."""
    view = api_totals(finished_demo)
    assert view["currency"] is not None, "the feed carries no exchange rate"
    rate = view["currency"]["rmb_per_usd"]
    fen = int((Decimal(view["gmv_cents"]) * Decimal(rate)).quantize(Decimal(1), ROUND_HALF_UP))
    minute = int((Decimal(view["gmv_last_minute_cents"]) * Decimal(rate))
                 .quantize(Decimal(1), ROUND_HALF_UP))
    await page.goto(finished_demo + "?currency=rmb")
    await expect(page.locator("#gmv")).to_have_text(f"¥{fen // 100:,}.{fen % 100:02d}")
    await expect(page.locator("#rate-note")).to_have_text(f"RMB at {rate} per USD")
    await expect(page.locator("#rate")).to_have_attribute(
        "title", f"¥{minute // 100:,}.{minute % 100:02d}")
    await expect(page.locator("#eyebrow")).to_contain_text("RMB")
    rmb = [m["label"] for m in view["milestones"] if m.get("currency") == "RMB"]
    if rmb:
        await expect(page.locator("#milestones")).to_contain_text(rmb[-1])
    usd = [m["label"] for m in view["milestones"] if m.get("currency") == "USD"]
    assert usd and usd[-1] not in await page.locator("#milestones").text_content()


# ---------- 5. kiosk, sizes, theme, idle cost ----------

async def test_kiosk_hides_the_cursor_the_controls_and_the_engineering_footer(finished_demo,
                                                                             page):
    """?kiosk=1 (even with ?operator=1): no footer (seq, batches, gaps), no operator controls,
    no currency toggle, and no cursor; without it the footer shows."""
    await page.goto(finished_demo)
    await expect(page.locator("#stats")).to_contain_text("batches")
    await page.goto(finished_demo + "?kiosk=1&operator=1")
    await expect(page.locator("#gmv")).to_have_text("$74,100,000,000.00")
    for hidden in ("#stats", "#operator", "#currency-toggle"):
        await expect(page.locator(hidden)).to_be_hidden()
    cursors = await page.evaluate(
        "[...document.querySelectorAll('body, #gmv, .panel')].map(e => getComputedStyle(e).cursor)")
    assert set(cursors) == {"none"}


@pytest.mark.parametrize("width,height,query", [
    (390, 844, ""), (390, 844, "?currency=rmb"), (1366, 768, ""), (1366, 768, "?currency=rmb"),
    (1920, 1080, "?kiosk=1"), (3840, 2160, "?kiosk=1")])
async def test_no_sideways_overflow_and_no_cut_text(finished_demo, page, width, height, query):
    """At a phone's 390×844, a laptop's 1366×768 and TVs' 1920×1080 and 3840×2160, in USD
    and in RMB (a longer figure), the page never scrolls sideways, the brand line is not cut
    ("31,000 overseas" whole), and on the landscape screens everything fits the screen
    without scrolling."""
    await page.set_viewport_size({"width": width, "height": height})
    await page.goto(finished_demo + query)
    await expect(page.locator("#gmv")).to_have_text(
        re.compile(r"^¥[\d,]+\.\d\d$" if "rmb" in query else r"^\$74,100,000,000\.00$"))
    await expect(page.locator("#top-brands li")).to_have_count(10)
    sizes = await page.evaluate("""() => ({
      scroll: document.documentElement.scrollWidth, inner: innerWidth,
      cut: [...document.querySelectorAll('.kpi-sub, .kpi-value, .gmv, .race, .clock-row, .ms')]
        .filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.className),
      outside: [...document.querySelectorAll('body *')].filter(e => {
        const r = e.getBoundingClientRect();
        return r.width && (r.right > innerWidth + 1 || r.left < -1);
      }).map(e => e.id || e.className),
      bottom: Math.max(...[...document.querySelectorAll('.panel, .stats')]
        .map(e => e.getBoundingClientRect().bottom)),
    })""")
    assert sizes["scroll"] <= sizes["inner"], sizes
    assert sizes["cut"] == [] and sizes["outside"] == [], sizes
    if width > height:
        assert sizes["bottom"] <= height, sizes


async def test_light_theme_from_the_address_or_the_system(finished_demo, page):
    """?theme=light, or a system that prefers light, gives a light background with dark
    text; ?theme=dark keeps the broadcast's dark one whatever the system prefers."""
    bg = "getComputedStyle(document.body).backgroundColor"
    luminance = "(c => c.match(/\\d+/g).slice(0, 3).reduce((a, b) => a + +b, 0))(%s)" % bg
    await page.emulate_media(color_scheme="dark")
    await page.goto(finished_demo)
    assert await page.evaluate(luminance) < 100
    await page.goto(finished_demo + "?theme=light")
    assert await page.evaluate(luminance) > 600
    await page.emulate_media(color_scheme="light")
    await page.goto(finished_demo)
    assert await page.evaluate(luminance) > 600
    await page.goto(finished_demo + "?theme=dark")
    assert await page.evaluate(luminance) < 100


async def test_an_idle_page_runs_no_animation_and_no_frames(finished_demo, page):
    """Once the totals stop changing the page runs no infinite CSS animation and asks for
    no animation frames: an idle screen costs next to nothing."""
    await page.add_init_script("""window.frames_asked = 0; const raf = window.requestAnimationFrame;
      window.requestAnimationFrame = (cb) => { window.frames_asked++; return raf(cb); };""")
    await page.goto(finished_demo)
    await expect(page.locator("#status")).to_have_attribute("data-state", "live",
                                                            timeout=10_000)
    await asyncio.sleep(1.0)
    before = await page.evaluate("window.frames_asked")
    await asyncio.sleep(2.0)
    assert await page.evaluate("window.frames_asked") == before
    running = await page.evaluate("""document.getAnimations()
      .filter(a => a.playState === 'running' && a.effect.getTiming().iterations === Infinity)
      .map(a => a.animationName || String(a))""")
    assert running == []


# ---------- 2 and 3. real runs: the badge to "done", a seek back from the operator view ----

@contextlib.contextmanager
def serving_2019(broker: BrokerSettings, topics: Topics) -> Iterator[str]:
    """`gmv aggregate` and `gmv serve` processes for the 2019 day; yields the page's URL."""
    from .conftest import free_port, wait_for_port

    port = free_port()
    args = ["--broker", broker.url, "--prefix", topics.prefix, "--scenario", "2019"]
    procs = [subprocess.Popen([sys.executable, "-m", "gmv.cli", "aggregate", *args,
                               "--no-checkpoint"]),
             subprocess.Popen([sys.executable, "-m", "gmv.cli", "serve", *args,
                               "--port", str(port)])]
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}/"
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["simulate", "replay"])
async def test_the_badge_follows_a_real_run_to_done_then_goes(mosquitto, topics, page,
                                                              tmp_path, kind):
    """`gmv simulate` and `gmv replay --broker` show "▶ 2000×" while they play and "■ done"
    when they finish (before, their last status never left the process: "▶ max" for good),
    and the badge goes once they have gone, so it never shows on a later run."""
    from .test_replay import write_recording

    argv = ["simulate", "--scenario", "2019", "--order-scale", "0.0001"]
    if kind == "replay":
        recording = tmp_path / "day.gmvrec"
        write_recording(recording, scenario_for_year(2019, order_scale=0.0001))
        argv = ["replay", str(recording)]
    with serving_2019(mosquitto, topics) as url:
        await page.goto(url)
        run = subprocess.Popen([sys.executable, "-m", "gmv.cli", *argv, "--broker",
                                mosquitto.url, "--prefix", topics.prefix, "--from",
                                "11-11 22:00", "--speed", "2000"], stdout=subprocess.DEVNULL)
        try:
            badge = page.locator("#replay")
            await expect(badge).to_have_text(re.compile(r"▶\s*2000×"), timeout=15_000)
            await expect(badge).to_have_text(re.compile(r"■\s*done"), timeout=30_000)
            assert run.wait(10) == 0
            await expect(badge).to_be_hidden(timeout=8_000)
        finally:
            run.kill()
            run.wait()


@pytest.mark.slow
async def test_a_seek_back_from_the_operator_view_shows_the_target_within_seconds(page):
    """Paused on Nov 6, a seek back to 11-02 12:00 from the operator view brings the page to
    exactly the GMV of the minutes before it, with the clock on Nov 2 11:59, within seconds
    (before: the festival rerun on screen from $0, about 11 s)."""
    scenario = scenario_for_year(2020, order_scale=0.0001)
    target = 1 * 1440 + 12 * 60
    with demo_process("--speed", "1584", "--order-scale", "0.0001", "--from", "11-06 00:00") \
            as (url, token):
        deadline = time.monotonic() + 30
        while (api_totals(url).get("minute") or 0) < 5 * 1440:
            assert time.monotonic() < deadline, "the demo did not reach Nov 6"
            time.sleep(0.2)
        await page.goto(url + "?operator=1")
        await page.fill("#operator-token", token)
        await page.click("#operator-pause")
        result = page.locator("#operator-result")
        await expect(result).to_have_text(re.compile(r"^paused at 11-0[6-9]"))
        await page.fill("#operator-seek", "11-02 12:00")
        clicked = time.monotonic()
        await page.click("#operator-seek-go")
        gmv = page.locator("#gmv")
        expected = str(int(scenario.minute_gmv_cents[:target].sum()))
        await expect(gmv).to_have_attribute("data-cents", expected, timeout=8_000)
        seconds = time.monotonic() - clicked
        await expect(page.locator("#clock")).to_have_text("Nov 2 · 11:59")
        await expect(gmv).to_have_attribute("data-shown", expected)
        await expect(result).to_have_text("seeking 11-02 12:00 ✓")
    print(f"seek back shown in {seconds:.2f} s")  # within 8 s: the rerun took about 11
