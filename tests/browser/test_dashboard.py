"""The reference dashboard at `/` in a real browser: Playwright driving Debian's chromium
against the real app, a real rollout worker on the Temporal dev server and PostgreSQL.

Each test saves screenshots under build/screenshots/ (at 1280 and 390 pixels wide)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from playwright.async_api import Browser, Page, ViewportSize, async_playwright, expect

from api.app import create_app
from core.auth import mint_dev_token
from core.settings import Settings
from devtools.localservers import free_port
from models.enums import Role
from services.fleet import refresh_fleet_counts_now
from tests.api.conftest import bearer, served
from tests.api.stream import delta, feed_vehicles
from tests.api.test_dashboard import CLIENT_ID, Issuer
from tests.api.test_rollout_control import (
    audit_rows,
    create_rollout,
    wait_for_stages,
    wait_for_status,
)
from tests.browser.test_eventsource import serve
from tests.factories import insert_signed_release, insert_vehicles

SHOTS = Path(__file__).resolve().parents[2] / "build" / "screenshots"
WAIT_MS = 60_000  # longest wait for the page to show something (a guard, not a measured time)
API_GUARD = 90  # seconds: longest wait for the worker to move a rollout (two suites at once)
WIDE: ViewportSize = {"width": 1280, "height": 900}
NARROW: ViewportSize = {"width": 390, "height": 844}
expect.set_options(timeout=WAIT_MS)


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        launched = await p.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def rollouts(
    http: httpx.AsyncClient,
    operator: dict,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
    rollout_worker: None,
) -> AsyncIterator[Any]:
    """`await rollouts.create()`: a running rollout of this test's own vehicles (its worker
    runs it); `rollouts.ids` may take others. Every one is aborted when the test ends."""

    class Rollouts:
        ids: list[int] = []

        async def create(self, **kw: Any) -> int:
            rid = await create_rollout(http, operator, database_url, signing_key, prefix, **kw)
            self.ids.append(rid)
            return rid

    made = Rollouts()
    made.ids = []
    yield made
    for rid in made.ids:
        await http.post(
            f"/api/v1/rollouts/{rid}/abort", headers=operator, json={"reason": "test over"}
        )


def audit_reasons(database_url: str, rid: int, action: str) -> list[str]:
    return [row[3] for row in audit_rows(database_url, rid, action)]


async def watched_page(browser: Browser, size: ViewportSize = WIDE) -> Page:
    """A page whose script errors are kept (`shoot` fails on any)."""
    page = await browser.new_page(viewport=size)
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors  # type: ignore[attr-defined]
    return page


async def open_page(
    browser: Browser, base: str, token: str, path: str, size: ViewportSize = WIDE
) -> Page:
    """The dashboard signed in as `make dev` does it: the token in the URL fragment."""
    page = await watched_page(browser, size)
    await page.goto(f"{base}/#token={token}")
    await expect(page.locator("#who")).not_to_be_empty()
    # The token left the address bar for this tab's storage.
    assert "token=" not in page.url
    if path != "/overview":
        await page.goto(f"{base}/#{path}")
    # The view has read its data (the page marks it once loaded).
    await expect(page.locator("main")).to_have_attribute("data-route", path.split("?")[0])
    return page


async def shoot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    assert not page.errors, page.errors  # type: ignore[attr-defined]


def refresh_counts(database_url: str) -> None:
    """What each reconcile run does: the fleet's counts recomputed (a `fleet.summary` event)."""
    with psycopg.connect(database_url) as conn:
        refresh_fleet_counts_now(conn)


async def overview_matches(page: Page, summary: dict[str, Any]) -> None:
    await expect(page.locator(".chart figcaption")).to_have_text(f"{summary['total']:,} vehicles")
    bars = page.locator(".chart li[data-status]")
    for status in ("in_sync", "pending", "updating", "blocked", "failed", "offline"):
        count = summary["byStatus"].get(status, 0)
        await expect(bars.and_(page.locator(f"[data-status='{status}']"))).to_have_attribute(
            "data-count", str(count)
        )
    for name, counts in summary["byModel"].items():
        row = page.locator(f"tr[data-place='{name}']").first
        await expect(row.locator("td").first).to_have_text(f"{counts['total']:,}")
    await expect(page.locator("ol.reasons li")).to_have_count(len(summary["topReasonCodes"]))


async def test_overview_matches_the_fleet_summary(
    browser: Browser,
    api_base_url: str,
    http: httpx.AsyncClient,
    viewer: dict,
    dev_key: str,
    database_url: str,
    prefix: str,
) -> None:
    insert_vehicles(database_url, [f"{prefix}a{n}" for n in range(3)], model=f"{prefix}m1")
    refresh_counts(database_url)
    summary = (await http.get("/api/v1/fleet/summary", headers=viewer)).json()["data"]
    assert summary["byModel"][f"{prefix}m1"]["total"] == 3
    page = await open_page(
        browser, api_base_url, mint_dev_token(dev_key, role=Role.VIEWER), "/overview"
    )
    await overview_matches(page, summary)
    await shoot(page, "overview-1280")
    # The counts change: the page follows the stream's `fleet.summary`, without a reload.
    insert_vehicles(database_url, [f"{prefix}b{n}" for n in range(2)], model=f"{prefix}m2")
    refresh_counts(database_url)
    summary = (await http.get("/api/v1/fleet/summary", headers=viewer)).json()["data"]
    assert summary["byModel"][f"{prefix}m2"]["total"] == 2
    await overview_matches(page, summary)
    await page.set_viewport_size(NARROW)
    await shoot(page, "overview-390")


async def test_a_new_rollout_appears_live_and_an_operator_pauses_it(
    browser: Browser,
    api_base_url: str,
    http: httpx.AsyncClient,
    operator: dict,
    viewer: dict,
    dev_key: str,
    database_url: str,
    rollouts: Any,
) -> None:
    page = await open_page(
        browser, api_base_url, mint_dev_token(dev_key, role=Role.OPERATOR), "/rollouts"
    )
    await expect(page.locator("#live")).to_have_attribute("data-state", "live")
    # Created through the API, not the page: it appears without a reload.
    rid = await rollouts.create(n=6)
    row = page.locator(f"tr[data-rollout='{rid}']")
    await expect(row).to_be_visible()
    await expect(row.locator(".status")).to_have_text("running")
    await shoot(page, "rollouts-1280")
    await row.get_by_role("link", name=f"#{rid}").click()
    await expect(page.locator("#rollout-status")).to_have_text("running")
    await expect(page.locator("li.stage")).to_have_count(2)
    link = page.get_by_role("link", name="in the Temporal UI")
    assert (await link.get_attribute("href") or "").endswith(f"/workflows/rollout-{rid}")
    await shoot(page, "rollout-running-1280")

    # Paused from the keyboard: the button, a reason, Enter.
    await page.get_by_role("button", name="Pause").focus()
    await page.keyboard.press("Enter")
    dialog = page.get_by_role("dialog")
    await expect(dialog).to_be_visible()
    await expect(page.locator("#confirm-reason")).to_be_focused()
    await page.keyboard.type("browser test: checking telemetry")
    await page.keyboard.press("Tab")  # Cancel
    await page.keyboard.press("Tab")  # Pause (no `force` for a pause)
    await expect(page.locator("#confirm-ok")).to_be_focused()
    await page.keyboard.press("Enter")
    await expect(dialog).to_be_hidden()
    await expect(page.locator("#rollout-status")).to_have_text("paused")
    await expect(page.get_by_role("button", name="Resume")).to_be_visible()
    await shoot(page, "rollout-paused-1280")
    await page.set_viewport_size(NARROW)
    await shoot(page, "rollout-paused-390")
    reasons = audit_reasons(database_url, rid, "rollout.pause_requested")
    assert reasons == ["browser test: checking telemetry"]
    await wait_for_status(http, viewer, rid, "paused")


async def test_a_viewer_sees_no_write_controls(
    browser: Browser, api_base_url: str, dev_key: str, rollouts: Any
) -> None:
    rid = await rollouts.create()
    page = await open_page(
        browser, api_base_url, mint_dev_token(dev_key, role=Role.VIEWER), f"/rollouts/{rid}"
    )
    await expect(page.locator("#rollout-status")).not_to_be_empty()
    await expect(page.locator(".stages, .card p.muted").first).to_be_visible()
    assert await page.get_by_role("group", name="Operator controls").count() == 0
    for name in ("Pause", "Resume", "Rollback", "Abort"):
        assert await page.get_by_role("button", name=name).count() == 0
    await page.goto(f"{api_base_url}/#/rollouts")
    await expect(page.locator(f"tr[data-rollout='{rid}']")).to_be_visible()
    assert await page.get_by_role("link", name="New rollout").count() == 0
    await shoot(page, "rollouts-viewer-1280")


async def hub_ready(app: Any) -> None:
    async with asyncio.timeout(WAIT_MS / 1000):
        while not (app.state.stream and app.state.stream.ready):  # noqa: ASYNC110 - a flag
            await asyncio.sleep(0.02)


def feed_vehicle(database_url: str, vehicle_id: str, status: str) -> int:
    """A `vehicle.updated` row as the telemetry path writes them."""
    reasons = ["INSTALL_FAILED"] if status == "failed" else []
    return feed_vehicles(
        database_url, [{**delta(vehicle_id), "status": status, "reasonCodes": reasons}]
    )


async def test_a_dropped_stream_reconnects_and_misses_nothing(
    browser: Browser, api_settings: Settings, dev_key: str, database_url: str, prefix: str
) -> None:
    ids = [f"{prefix}{n}" for n in range(3)]
    insert_vehicles(database_url, ids)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    token = mint_dev_token(dev_key, role=Role.VIEWER)
    async with serve(first := create_app(api_settings), port):
        await hub_ready(first)
        page = await open_page(browser, base, token, f"/vehicles?q={prefix}")
        live = page.locator("#live")
        await expect(live).to_have_attribute("data-state", "live")
        for vid in ids:
            await expect(page.get_by_role("link", name=vid, exact=True)).to_be_visible()
    # The API is gone: the page says so ...
    await expect(live).to_have_attribute("data-state", "reconnecting")
    # ... changes happen meanwhile ...
    feed_vehicle(database_url, ids[0], "failed")
    feed_vehicle(database_url, ids[1], "updating")
    await asyncio.sleep(1)
    async with serve(again := create_app(api_settings), port):
        await hub_ready(again)  # until then the stream answers 503 (a browser retry is refused)
        # ... and when it is back, the page resumes after the last event it saw.
        await expect(live).to_have_attribute("data-state", "live")
        rows = {
            vid: page.get_by_role("row").filter(has=page.get_by_role("link", name=vid, exact=True))
            for vid in ids
        }
        await expect(rows[ids[0]].locator(".badge")).to_have_text("failed")
        await expect(rows[ids[1]].locator(".badge")).to_have_text("updating")
        feed_vehicle(database_url, ids[2], "offline")
        await expect(rows[ids[2]].locator(".badge")).to_have_text("offline")
        await shoot(page, "vehicles-after-reconnect-1280")


async def test_an_operator_creates_a_rollout_after_seeing_its_plan(
    browser: Browser,
    api_base_url: str,
    http: httpx.AsyncClient,
    operator: dict,
    dev_key: str,
    database_url: str,
    prefix: str,
    signing_key: Ed25519PrivateKey,
    rollouts: Any,
) -> None:
    release = f"{prefix}2027.2.0"
    insert_signed_release(database_url, signing_key, release)
    ids = [f"{prefix}{n:03d}" for n in range(4)]
    insert_vehicles(database_url, ids, battery_percent=90)
    page = await open_page(
        browser, api_base_url, mint_dev_token(dev_key, role=Role.OPERATOR), "/rollouts/new"
    )
    await page.get_by_label("Release").select_option(release)
    await page.get_by_label("Vehicle ids").fill(", ".join(ids))
    await page.get_by_label("Canary (% of targets)").fill("25")
    await page.get_by_label("Waves (cumulative %, last 100)").fill("100")
    create = page.get_by_role("button", name="Create rollout")
    await expect(create).to_be_disabled()  # not before its plan has been shown
    await page.get_by_role("button", name="Plan (dry run)").click()
    await expect(page.get_by_text("4 vehicles on")).to_be_visible()
    await expect(page.locator("table").last.locator("tbody tr")).to_have_count(2)
    await expect(create).to_be_enabled()
    await shoot(page, "rollout-plan-1280")
    # A reason is required; a change of the inputs asks for the plan again.
    await create.click()
    await expect(page.get_by_text("A reason is required.")).to_be_visible()
    await page.get_by_label("Reason (required, audited)").fill(
        "browser test: created from its plan"
    )
    await expect(create).to_be_enabled()  # the reason is not part of the plan
    await page.get_by_label("Canary bake (s)").fill("900")
    await expect(create).to_be_disabled()  # the strategy is
    await page.get_by_role("button", name="Plan (dry run)").click()
    await expect(create).to_be_enabled()
    await create.click()
    await expect(page.locator("#rollout-status")).to_have_text("running")
    rid = int(page.url.rsplit("/", 1)[1])
    rollouts.ids.append(rid)
    got = await wait_for_stages(http, operator, rid)
    assert got["targets"]["vehicleIds"] == ids and got["releaseVersion"] == release
    assert [s["vehicles"] for s in got["stages"]] == [1, 3]
    reasons = audit_reasons(database_url, rid, "rollout.created")
    assert reasons == ["browser test: created from its plan"]
    # Its vehicles are listed once the targets are expanded (the page follows).
    await expect(page.locator("section", has_text="Vehicles").locator("tbody tr")).to_have_count(4)


async def test_the_audit_log_filters_and_exports(
    browser: Browser,
    api_base_url: str,
    dev_key: str,
    tmp_path: Path,
    rollouts: Any,
) -> None:
    rid = await rollouts.create()
    page = await open_page(
        browser,
        api_base_url,
        mint_dev_token(dev_key, role=Role.VIEWER),
        f"/audit?targetType=rollout&targetId={rid}",
    )
    rows = page.locator("tbody tr")
    await expect(rows.filter(has_text="rollout.created")).to_have_count(1)
    shown = await rows.count()
    for text in await rows.all_inner_texts():  # the filter holds: this rollout's only
        assert f"rollout {rid}\t" in text, text
    await shoot(page, "audit-1280")
    async with page.expect_download() as waiting:
        await page.get_by_role("button", name="Export NDJSON").click()
    download = await waiting.value
    saved = tmp_path / "audit.ndjson"
    await download.save_as(saved)
    entries = [json.loads(line) for line in saved.read_text().splitlines()]
    assert len(entries) >= shown  # its workflow may have added some since
    assert {(e["targetType"], e["targetId"]) for e in entries} == {("rollout", str(rid))}
    assert "rollout.created" in {e["action"] for e in entries}


async def test_sign_in_through_the_issuer_and_out_again(
    browser: Browser, api_settings: Settings, issuer: Issuer
) -> None:
    async with served(api_settings, oidc_issuer=issuer.base, oidc_client_id=CLIENT_ID) as client:
        base = str(client.base_url).rstrip("/")
        page = await watched_page(browser)
        await page.goto(f"{base}/")
        await page.get_by_role("link", name="Sign in with your identity provider").click()
        # To the issuer (which signs alice in at once), back to the callback, then the page.
        await expect(page.locator("#who")).to_have_text("alice@example.com (operator)")
        assert "token" not in page.url
        await shoot(page, "signed-in-oidc-1280")
        await page.get_by_role("button", name="Sign out").click()
        await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        assert await page.get_by_text("Something went wrong").count() == 0
        # With an issuer, a link carrying a token signs nobody in.
        forged = mint_dev_token(api_settings.dev_key.get_secret_value(), role=Role.OPERATOR)  # type: ignore[union-attr]
        await page.goto(f"{base}/#token={forged}")
        await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        await expect(page.locator("#session")).to_be_hidden()
        assert await page.locator("#who").text_content() in ("", None)
        await page.close()


async def test_the_page_renews_its_ticket_before_it_expires(
    browser: Browser, api_settings: Settings, dev_key: str, database_url: str, prefix: str
) -> None:
    """Tickets of 6 s: the page mints a fresh one before each expires and opens the next
    stream before closing the last, so it stays live and keeps receiving events."""
    vid = f"{prefix}0"
    insert_vehicles(database_url, [vid])
    port = free_port()
    app = create_app(api_settings.model_copy(update={"stream_ticket_seconds": 6}))
    async with serve(app, port):
        await hub_ready(app)
        token = mint_dev_token(dev_key, role=Role.VIEWER)
        page = await open_page(browser, f"http://127.0.0.1:{port}", token, f"/vehicles?q={prefix}")
        live = page.locator("#live")
        await expect(live).to_have_attribute("data-state", "live")
        streams: list[str] = []
        page.on("request", lambda r: streams.append(r.url) if "/api/v1/stream?" in r.url else None)
        # Three tickets' lifetimes later ...
        await page.wait_for_timeout(16_000)
        assert len(streams) >= 2, streams  # a new stream (a new ticket) every 5 s or so
        assert all("ticket=" in url for url in streams)
        await expect(live).to_have_attribute("data-state", "live")
        # ... events still arrive.
        feed_vehicle(database_url, vid, "failed")
        row = page.get_by_role("row").filter(has=page.get_by_role("link", name=vid, exact=True))
        await expect(row.locator(".badge")).to_have_text("failed")
        await shoot(page, "vehicles-after-renewals-1280")


async def test_one_vehicle_shows_desired_against_actual_and_its_timeline(
    browser: Browser,
    api_base_url: str,
    http: httpx.AsyncClient,
    viewer: dict,
    token: Any,
    dev_key: str,
    rollouts: Any,
) -> None:
    rid = await rollouts.create(n=2)
    # The canary's one vehicle (whichever ranks first), once its worker has notified it.
    vid, desired = "", dict[str, Any]()
    async with asyncio.timeout(API_GUARD):
        while not desired.get("desiredStateId"):
            await asyncio.sleep(0.2)
            canary = await http.get(
                f"/api/v1/rollouts/{rid}/vehicles", headers=viewer, params={"stage": "canary"}
            )
            notified = [v for v in canary.json()["data"] if v["desiredStateId"]]
            if notified:
                vid = notified[0]["vehicleId"]
                got = await http.get(f"/api/v1/vehicles/{vid}", headers=viewer)
                desired = got.json()["data"]["desired"]
    page = await open_page(
        browser, api_base_url, mint_dev_token(dev_key, role=Role.VIEWER), f"/vehicles/{vid}"
    )
    release = desired["releaseVersion"]
    await expect(page.locator("dd.differs")).to_contain_text(release)  # not running it yet
    await expect(page.get_by_role("link", name=f"rollout {rid}")).to_be_visible()
    # The vehicle starts installing: its timeline and status follow without a reload.
    event = {
        "eventId": str(uuid.uuid4()),
        "vehicleId": vid,
        "seq": 1,
        "type": "apply_start",
        "occurredAt": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "desiredStateId": desired["desiredStateId"],
        "releaseVersion": release,
    }
    sent = await http.post(
        "/api/v1/telemetry", headers=bearer(token("gateway")), json={"events": [event]}
    )
    assert sent.status_code == 202, sent.text
    await expect(page.locator("h1 .badge")).to_have_text("updating")
    await expect(page.get_by_role("cell", name="apply_start")).to_be_visible()
    await shoot(page, "vehicle-1280")
