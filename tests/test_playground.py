"""The playground page in a real browser (headless Chromium driven by Playwright) against a real
`python -m service` on loopback, serving the bundled models behind an API key.

Screenshots of each view at 1280 x 720 and at phone width land in test-artifacts/playground/."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from conftest import REPO_ROOT, free_port, running_server, service_command

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
expect = sync_api.expect

CHROMIUM = os.environ.get("FLOW_TEST_CHROMIUM") or next(
    (found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))), None
)
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (apt-get install chromium)"),
]
KEY = "playground-key"
ARTIFACTS = REPO_ROOT / "test-artifacts" / "playground"
VIEWPORTS = {"desktop": {"width": 1280, "height": 720}, "phone": {"width": 390, "height": 844}}


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("playground") / "server.log"
    port = free_port()
    env = {"FLOW_API_KEY": KEY, "FLOW_WARMUP_PASSES": "0", "FLOW_DEVICE": "cpu"}
    command = service_command(REPO_ROOT / "models", port)
    with running_server(command, port, log, env=env, timeout=120) as address:
        yield address


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


class Page:
    """A playground tab, with every console error and page error it raised."""

    def __init__(self, browser, url: str, viewport: str = "desktop", model: str = "") -> None:
        self.page = browser.new_page(viewport=VIEWPORTS[viewport])
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.posts: list[tuple[str, dict]] = []
        self.page.on("request", self._record)
        self.page.goto(f"{url}/playground" + (f"?model={model}" if model else ""))

    def _record(self, request) -> None:
        if request.method == "POST":
            self.posts.append((request.url.rsplit("/", 1)[1], request.post_data_json))

    def connect(self, key: str = KEY) -> None:
        self.page.fill("#key", key)
        self.page.click("#connect")

    def wait_for_request_line(self, text: str) -> None:
        # Locator assertions, not wait_for_function: the page's CSP forbids evaluating strings.
        expect(self.page.locator("#n-request")).to_contain_text(text, timeout=60_000)

    def inked_pixels(self, band: tuple[float, float] = (0.0, 1.0)) -> int:
        """Pixels of the canvas (within a horizontal band, as shares of its height) that differ
        from the white background and the black of an empty image cell."""
        return self.page.evaluate(
            """([top, bottom]) => {
                const canvas = document.getElementById('canvas');
                const y0 = Math.floor(top * canvas.height), y1 = Math.floor(bottom * canvas.height);
                const context = canvas.getContext('2d');
                const data = context.getImageData(0, y0, canvas.width, y1 - y0).data;
                let inked = 0;
                for (let i = 0; i < data.length; i += 4) {
                    const [r, g, b] = [data[i], data[i + 1], data[i + 2]];
                    if (!(r > 250 && g > 250 && b > 250) && (r + g + b) > 40) inked++;
                }
                return inked;
            }""",
            list(band),
        )

    def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@pytest.mark.parametrize("viewport", list(VIEWPORTS))
def test_each_view_draws_with_no_console_errors(browser, url: str, viewport: str) -> None:
    tab = Page(browser, url, viewport, model="four-gaussians")
    tab.connect()
    tab.wait_for_request_line("/trajectory 600 x 40 euler")
    assert tab.inked_pixels() > 2000
    tab.screenshot(f"flow-{viewport}")
    for view, line in (("field", "/velocity 441 points"), ("density", "/log_prob 2304 points")):
        tab.page.click(f"nav button[data-view={view}]")
        tab.wait_for_request_line(line)
        assert tab.inked_pixels() > 2000, view
        tab.screenshot(f"{view}-{viewport}")
    # The density view integrates what it drew: the share of mass in the square shown.
    expect(tab.page.locator("#n-extra")).not_to_have_text("-")
    assert 0.8 < float(tab.page.inner_text("#n-extra")) < 1.2
    assert int(tab.page.inner_text("#n-nfe")) == 40
    assert tab.errors == []


def test_changing_steps_and_solver_sends_them_and_redraws(browser, url: str) -> None:
    tab = Page(browser, url, model="four-gaussians")
    tab.connect()
    tab.wait_for_request_line("/trajectory 600 x 40 euler")
    tab.page.fill("#num_steps", "12")
    tab.page.press("#num_steps", "Tab")  # change fires when the field loses focus
    tab.wait_for_request_line("/trajectory 600 x 12 euler")
    tab.page.select_option("#solver", "rk4")
    tab.wait_for_request_line("/trajectory 600 x 12 rk4")
    sent = [body for path, body in tab.posts if path == "trajectory"]
    assert sent[-1]["num_steps"] == 12 and sent[-1]["solver"] == "rk4"
    assert sent[-2]["num_steps"] == 12 and sent[-2]["solver"] == "euler"
    assert tab.page.inner_text("#n-nfe") == "48"  # 12 steps x 4 stages, the server's answer
    assert tab.inked_pixels() > 2000
    assert tab.errors == []


def test_the_image_view_shows_ten_classes_and_labels_pick_them(browser, url: str) -> None:
    tab = Page(browser, url, model="digits")
    tab.connect()
    tab.wait_for_request_line("/trajectory 40 images")
    canvas = tab.page.locator("#canvas")
    assert canvas.get_attribute("data-classes") == "10"
    for row in range(10):  # every class's row of the grid holds drawn digits
        assert tab.inked_pixels((row / 10, (row + 1) / 10)) > 500, row
    tab.screenshot("images-desktop")
    tab.page.fill("#labels", "3, 7")
    tab.page.press("#labels", "Tab")
    expect(canvas).to_have_attribute("data-classes", "2", timeout=60_000)
    body = [body for path, body in tab.posts if path == "trajectory"][-1]
    assert sorted(set(body["labels"])) == [3, 7]
    assert body["guidance_scale"] == 1.5  # the model's default, shown on the slider
    assert tab.errors == []


def test_a_wrong_key_shows_the_401_message(browser, url: str) -> None:
    tab = Page(browser, url, model="four-gaussians")
    tab.connect("not-the-key")
    message = tab.page.locator("#message")
    message.wait_for(state="visible")
    assert message.inner_text().startswith("Error 401:")
    assert "API key" in message.inner_text()
    assert tab.inked_pixels() > 1000  # the canvas says it too, rather than staying blank
    tab.screenshot("error-401")
    # The console's only complaint is the browser's own note of the refused call.
    assert all("401" in error for error in tab.errors)
