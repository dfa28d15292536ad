"""The dashboard in Debian's Chromium (headless, via Playwright), at desktop and phone widths.

Every request that is not to the appliance on 127.0.0.1 is blocked and recorded: the page must work
with no internet. Screenshots go to each test's tmp dir (``dashboard-<width>.png``).
"""

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.conftest import chromium, free_port, running_up

PAST = 4  # past predictions per model the chart must show before it is judged

#: Per model, how many of its past predictions (target candle closed) are drawn as a point and inside a
#: band: read off the canvas with every model shown, then again with every model toggled off through the
#: legend, all within one task (no redraw from new data in between). A pixel that changes was drawn by
#: that model's series.
DRAWN = """async ([product, g]) => {
  const h = window.cryptopi.get(product).horizons.get(g), u = h.chart;
  const px = ([x, y]) => Array.from(u.ctx.getImageData(Math.round(x), Math.round(y), 1, 1).data).join();
  const last = Math.max(...h.candles.keys()) + g, t = p => Date.parse(p.target_time) / 1000;
  const spots = [...h.predictions.values()].filter(p => t(p) <= last).map(p => {
    const x = u.valToPos(t(p), "x", true);
    return {model: p.model, point: [x, u.valToPos(p.predicted_close, "y", true)],
            band: [x, u.valToPos((p.interval.lower + p.predicted_close) / 2, "y", true)]};
  });
  const before = spots.map(s => [px(s.point), px(s.band)]);
  const buttons = [...h.node.querySelectorAll(".legend button")];
  buttons.forEach(b => b.click());
  await null; await null;  // uPlot redraws in a microtask: after it, before any WebSocket message
  const pressed = buttons.map(b => b.getAttribute("aria-pressed"));
  const after = spots.map(s => [px(s.point), px(s.band)]);
  buttons.forEach(b => b.click());
  const out = {};
  spots.forEach((s, i) => {
    const o = out[s.model] ||= {past: 0, points: 0, bands: 0};
    o.past += 1; o.points += before[i][0] !== after[i][0]; o.bands += before[i][1] !== after[i][1];
  });
  const closes = u.data[1].filter(v => v != null).length;
  return {models: out, buttons: buttons.map(b => b.dataset.model), pressed, closes};
}"""
ENOUGH_PAST = f"""([product, g]) => {{
  const c = window.cryptopi && window.cryptopi.get(product), h = c && c.horizons.get(g);
  if (!h || !h.chart || !h.candles.size) return false;
  const last = Math.max(...h.candles.keys()) + g, n = {{}};
  for (const p of h.predictions.values())
    if (Date.parse(p.target_time) / 1000 <= last) n[p.model] = (n[p.model] || 0) + 1;
  return Object.keys(n).length >= 2 && Object.values(n).every(k => k >= {PAST});
}}"""
CHART_FITS = """([product, g]) => {
  const h = window.cryptopi.get(product).horizons.get(g), box = h.node.querySelector(".chart");
  return h.chart.width === Math.max(200, box.clientWidth) ? h.chart.width : 0;
}"""


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = tmp_path_factory.mktemp("dashboard")
    with running_up(data, None) as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = chromium(pw)
        yield b
        b.close()


class Visit:
    """A page at one viewport with everything off-loopback blocked, and what went wrong on it."""

    def __init__(self, browser: Browser, url: str, width: int, height: int) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.blocked: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._guard)
        self.page: Page = self.context.new_page()
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(url)

    def _guard(self, route: Any) -> None:
        if urlsplit(route.request.url).hostname in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort()

    def overflow(self) -> int:
        """How far the page is wider than the window (0: no horizontal scroll)."""
        return int(self.page.evaluate("document.documentElement.scrollWidth - window.innerWidth"))

    def close(self) -> None:
        self.context.close()


@pytest.mark.parametrize(("width", "height"), [(1280, 800), (390, 844), (360, 740)])
def test_chart_shows_past_predictions_and_bands_against_the_closes(
    appliance: str, browser: Browser, tmp_path: Path, width: int, height: int
) -> None:
    visit = Visit(browser, appliance, width, height)
    page = visit.page
    try:
        for product, g in ((p, g) for p in ("BTC-USD", "ETH-USD") for g in (3600, 900)):
            page.wait_for_function(ENOUGH_PAST, arg=[product, g], timeout=60_000)
            drawn = page.evaluate(DRAWN, [product, g])
            assert sorted(drawn["buttons"]) == ["cnn", "lasso", "persistence"], drawn
            assert drawn["pressed"] == ["false"] * 3, "the legend toggles models off"
            assert drawn["closes"] >= 40, "the realized closes of the last 48 candles"
            for model, seen in drawn["models"].items():
                what = f"{product} {g}s {model}"
                assert seen["past"] >= PAST, (what, seen)
                assert seen["points"] == seen["past"], f"{what}: not every past prediction {seen}"
                assert seen["bands"] == seen["past"], f"{what}: not every 80 % band {seen}"
            horizon = page.locator(f'.card[data-product="{product}"] .horizon[data-granularity="{g}"]')
            row = horizon.locator('tr[data-model="cnn"]')
            assert row.locator(".predicted").inner_text().replace(",", "").replace(".", "").isdigit()
            mae = row.locator(".mae")
            scored = int(mae.locator(".sub").inner_text().removeprefix("n = "))
            muted = "few" in (mae.get_attribute("class") or "")
            assert muted == (scored < 24), f"{scored} scored predictions, muted: {muted}"
            # Its own version (not the pooled set), and how its intervals were calibrated.
            meta = horizon.locator(".meta").inner_text()
            assert "(pooled)" not in meta
            assert meta.endswith(" · intervals calibrated in training"), meta
            assert page.locator(f'.card[data-product="{product}"] .unit').inner_text() == "USD"  # the quote
        assert page.locator('.card[data-product="BTC-USD"] .fresh').inner_text().startswith("updated")
        assert visit.overflow() <= 0, f"horizontal scroll at {width} px"
        page.screenshot(path=str(tmp_path / f"dashboard-{width}.png"), full_page=True)
    finally:
        visit.close()
    assert visit.errors == []
    assert visit.blocked == [], "the dashboard asked for something off the appliance"
    assert (tmp_path / f"dashboard-{width}.png").stat().st_size > 10_000


def test_charts_redraw_to_the_new_width_on_resize(appliance: str, browser: Browser, tmp_path: Path) -> None:
    visit = Visit(browser, appliance, 1280, 800)
    page = visit.page
    try:
        page.wait_for_function(ENOUGH_PAST, arg=["BTC-USD", 3600], timeout=60_000)
        wide = page.wait_for_function(CHART_FITS, arg=["BTC-USD", 3600]).json_value()
        page.set_viewport_size({"width": 360, "height": 740})
        narrower = f"a => {{ const w = ({CHART_FITS})(a); return w && w < {wide} ? w : 0; }}"
        narrow = page.wait_for_function(narrower, arg=["BTC-USD", 3600], timeout=10_000).json_value()
        assert narrow < 360 < wide
        assert visit.overflow() <= 0
        page.screenshot(path=str(tmp_path / "dashboard-resized-360.png"), full_page=True)
    finally:
        visit.close()
    assert visit.errors == []


def test_no_data_says_waiting_and_shows_what_is_wrong(tmp_path: Path, browser: Browser) -> None:
    """Coinbase and the broker unreachable, an empty store: no freshness claimed, the reasons shown."""
    dead = free_port()
    with running_up(tmp_path, None, ready=lambda health: bool(health["problems"]),
                    coinbase_ws_url=f"ws://127.0.0.1:{dead}", coinbase_rest_url=f"http://127.0.0.1:{dead}",
                    mqtt_url=f"mqtt://127.0.0.1:{dead}") as (url, _):  # fmt: skip
        visit = Visit(browser, url, 390, 844)
        page = visit.page
        try:
            page.locator('.card[data-product="BTC-USD"] .horizon[data-granularity="3600"]').wait_for()
            page.locator("#problems li").first.wait_for()
            page.wait_for_timeout(1200)  # two ticks of the freshness clock
            for product in ("BTC-USD", "ETH-USD"):
                card = page.locator(f'.card[data-product="{product}"]')
                assert card.locator(".fresh").inner_text() == "waiting for data…"
                assert card.locator(".meta").all_inner_texts() == ["no prediction yet"] * 2  # both horizons
            problems = page.locator("#problems").inner_text()
            assert "MQTT broker unreachable" in problems
            assert f"127.0.0.1:{dead}" in problems
            assert "DISCONNECTED" in page.locator("#status").inner_text()
            assert visit.overflow() <= 0
            page.screenshot(path=str(tmp_path / "dashboard-no-data-390.png"), full_page=True)
        finally:
            visit.close()
    assert visit.blocked == []
