"""The playground page in a real browser: headless Chromium (the system's package) driven by
Playwright. Load the page, chat with streaming, run the tiny video model and see the video.
Screenshots of failures go to tests/artifacts/."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import httpx
import pytest

from tests.conftest import API_KEY

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_page_is_served_without_a_key(client):
    from fastapi.testclient import TestClient

    bare = TestClient(client.app)
    for path in ("/", "/playground"):
        response = bare.get(path)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
        assert 'id="chat-send"' in response.text and "/v1/chat/completions" in response.text


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium binary (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, request):
    """A fresh browser page; a screenshot lands in tests/artifacts/ when the test using it fails."""
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    failed_before = request.session.testsfailed
    yield page
    if request.session.testsfailed > failed_before:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()


def png_file(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "red.png"
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue())
    return path


def test_chat_streams_and_a_video_plays(page, live_server, tmp_path):
    page.goto(f"{live_server.url}/")
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_selector("#auth-state:has-text('signed in')")
    page.wait_for_selector("#chat-model option[value^='ember/tiny-chat:']", state="attached")

    page.fill("#max-tokens", "24")
    page.fill("#temperature", "0")
    page.fill("#chat-input", "hello there")
    page.click("#chat-send")
    page.wait_for_selector("#chat-stats:has-text('tok/s')", timeout=120_000)
    reply = page.locator(".msg.assistant").last
    assert reply.inner_text().strip()
    assert int(reply.get_attribute("data-chunks")) > 1  # the text arrived in pieces
    assert "TTFT" in page.inner_text("#chat-stats")
    assert "hello there" in page.evaluate("localStorage.getItem('ember.sessions')")  # session history kept

    page.select_option("#video-model", index=0)
    page.set_input_files("#video-image", str(png_file(tmp_path)))
    page.fill("#video-steps", "2")
    page.click("#video-run")
    page.wait_for_selector("#video-output[src]", state="attached", timeout=180_000)
    src = page.get_attribute("#video-output", "src")
    assert src.endswith("/content")
    video = httpx.get(src)
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert "succeeded" in page.inner_text("#video-status")

    page.click("#predictions-refresh")
    page.wait_for_selector("#predictions tr[data-id]")
    assert "succeeded" in page.inner_text("#predictions")
    assert page.errors == []


def test_models_panel_sleeps_and_wakes_a_model(page, live_server):
    page.goto(f"{live_server.url}/playground")
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    auth = {"Authorization": f"Bearer {API_KEY}"}
    version = httpx.get(f"{live_server.url}/v1/models/ember/tiny-chat", headers=auth).json()["latest_version"]["id"]
    httpx.post(f"{live_server.url}/v1/models/ember/tiny-chat/versions/{version}/unload", headers=auth)
    page.click("#models-refresh")
    page.wait_for_selector("#models-table tr[data-model='ember/tiny-chat'] td.status:text-is('unloaded')")
    row = page.locator("#models-table tr[data-model='ember/tiny-chat']")
    assert row.locator("button[data-action='sleep']").is_disabled()
    row.locator("button[data-action='load']").click()
    page.wait_for_selector("#models-table tr[data-model='ember/tiny-chat'] td.status:text-is('ready')",
                           timeout=120_000)
    assert "MiB" in row.inner_text()
    row.locator("button[data-action='sleep']").click()
    page.wait_for_selector("#models-table tr[data-model='ember/tiny-chat'] td.status:text-is('sleeping')")
    row.locator("button[data-action='wake']").click()
    page.wait_for_selector("#models-table tr[data-model='ember/tiny-chat'] td.status:text-is('ready')")
    assert page.errors == []


def test_the_page_works_with_auth_off(browser, tmp_path, demo_folders, models_file):
    from tests.conftest import LiveServer, make_settings

    (tmp_path / "demo").mkdir()
    for name, folder in demo_folders.items():
        (tmp_path / "demo" / name).symlink_to(folder, target_is_directory=True)
    server = LiveServer(lambda port: make_settings(tmp_path, models_file, port=port, api_keys=[])).start()
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{server.url}/")
        page.wait_for_selector("#auth-state:has-text('signed in')")
        page.wait_for_selector("#chat-model option[value^='ember/tiny-chat:']", state="attached")
        page.fill("#max-tokens", "4")
        page.fill("#chat-input", "hi")
        page.click("#chat-send")
        page.wait_for_selector("#chat-stats:has-text('tok/s')", timeout=120_000)
    except Exception:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "test_the_page_works_with_auth_off.png"), full_page=True)
        raise
    finally:
        context.close()
        server.stop()
