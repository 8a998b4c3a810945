"""The web page on GET /, in a real headless Chromium (the distribution's) driven by Playwright."""

import os
import shutil

import pytest
from playwright.sync_api import expect, sync_playwright

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Root runs Chromium here, and this machine has no network beyond loopback: no sandbox, no background traffic.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


#: Where distributions put Chromium (Debian: chromium; Ubuntu: a snap, /snap/bin/chromium), or Chrome.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium():
    """SANDRUN_TEST_CHROMIUM, or the first of CHROMIUM_NAMES on PATH (and /snap/bin)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/snap/bin"
    found = os.environ.get("SANDRUN_TEST_CHROMIUM") or next(filter(None, (shutil.which(n, path=path) for n in CHROMIUM_NAMES)), None)
    assert found, f"no Chromium: install one of {', '.join(CHROMIUM_NAMES)}, or set SANDRUN_TEST_CHROMIUM to its path"
    return found


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(base_url=f"http://127.0.0.1:{server.port}", accept_downloads=True)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # Chromium logs every non-2xx answer (a 400 on purpose, /favicon.ico) as an error; anything else counts.
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" and "Failed to load resource" not in msg.text else None)
    page.on("dialog", lambda dialog: errors.append("dialog: " + dialog.message))
    yield page
    context.close()
    assert errors == [], errors  # no script error, no CSP violation, and no alert a job could have caused


def test_browsers_get_the_page_and_clients_the_json(server):
    status, headers, body = server.request("GET", "/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8" and b"<title>Sandrun</title>" in body
    assert "script-src 'sha256-" in headers["content-security-policy"] and "unsafe-inline" not in headers["content-security-policy"]
    status, headers, body = server.request("GET", "/", headers={"Accept": "*/*"})
    assert headers["content-type"] == "application/json; charset=utf-8"


def test_run_a_python_job_see_its_output_and_download_a_file(page, tmp_path):
    page.goto("/")
    expect(page.locator("#interpreter")).to_have_value("python3")
    code = "import sys\nprint('<script>alert(1)</script> & <b>bold</b>')\nprint('to stderr', file=sys.stderr)\nopen('result.txt', 'w').write('42')"
    page.fill("#code", code)
    page.locator("#code").press("Control+Enter")
    expect(page.locator("#status")).to_have_text("Completed", timeout=30_000)
    expect(page.locator("#stdout")).to_have_text("<script>alert(1)</script> & <b>bold</b>\n")  # characters, not markup
    assert page.locator("#stdout script, #stdout b").count() == 0
    expect(page.locator("#stderr")).to_have_text("to stderr\n")
    expect(page.locator("#meta")).to_contain_text("exit code 0")
    expect(page.locator("#meta")).to_contain_text("peak memory")
    link = page.locator("#files a", has_text="result.txt")
    expect(link).to_be_visible()
    with page.expect_download() as download:
        link.click()
    saved = tmp_path / "result.txt"
    download.value.save_as(saved)
    assert saved.read_text() == "42"
    expect(page.locator("#quota")).to_contain_text("jobs left this hour")
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)  # renders at all


def test_live_output_and_an_image_output(page):
    page.goto("/")
    page.fill("#code", "import time, base64\nprint('first', flush=True)\ntime.sleep(2)\n"
                       "open('dot.png', 'wb').write(base64.b64decode("
                       "'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=='))")
    page.click("#run")
    expect(page.locator("#stdout")).to_have_text("first\n", timeout=30_000)
    expect(page.locator("#status")).to_have_text("Running…")  # the output came before the end
    expect(page.locator("#status")).to_have_text("Completed", timeout=30_000)
    image = page.locator("#files img")
    expect(image).to_have_attribute("alt", "dot.png")
    assert image.evaluate("img => img.complete && img.naturalWidth") == 1


def test_a_matplotlib_plot_comes_back_as_a_picture(page, tmp_path):
    """The data stack end to end: a plot drawn in the jail is shown inline. SANDRUN_SCREENSHOT=docs/screenshot.png keeps README's picture."""
    page.goto("/")
    expect(page.locator("#language")).to_contain_text("matplotlib")
    page.fill("#code", "import numpy as np, matplotlib.pyplot as plt\n"
                       "x = np.linspace(0, 4 * np.pi, 400)\n"
                       "plt.plot(x, np.sin(x) * np.exp(-x / 8), label='damped')\nplt.plot(x, np.cos(x), label='cos')\n"
                       "plt.legend(); plt.title('Drawn in the jail')\nplt.savefig('plot.png', dpi=80)\n"
                       "print('mean', round(float(np.mean(np.cos(x))), 3))")
    page.click("#run")
    expect(page.locator("#status")).to_have_text("Completed", timeout=60_000)
    expect(page.locator("#files a:not(#all)")).to_have_text(["plot.png"])  # the one file the job wrote
    image = page.locator("#files img")
    expect(image).to_have_attribute("alt", "plot.png")
    assert image.evaluate("img => img.complete && [img.naturalWidth, img.naturalHeight]") == [512, 384]  # 6.4 x 4.8 in at 80 dpi
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    if os.environ.get("SANDRUN_SCREENSHOT"):
        page.set_viewport_size({"width": 1280, "height": 900})
        page.screenshot(path=os.environ["SANDRUN_SCREENSHOT"], full_page=True)


def test_each_language_is_labelled_with_its_version_and_its_starter_runs(page, server):
    """The picker says what GET / says; each language's starter, as offered, reads stdin and its arguments."""
    _, _, info = server.json("GET", "/")
    page.goto("/")
    options = page.locator("#interpreter option")
    expect(options).to_have_count(len(info["languages"]))
    for name, language in info["languages"].items():
        label = f"{name} {language['version']}" + (" (compiled)" if language["compiles"] else "")
        expect(page.locator(f"#interpreter option[value='{name}']")).to_have_text(label)
        page.select_option("#interpreter", name)
        assert page.input_value("#code").strip(), name  # a starter was offered
        page.fill("#stdin", "Ada\n")
        page.fill("#args", "x")
        page.click("#run")
        expect(page.locator("#status")).to_have_text("Completed", timeout=60_000)
        expect(page.locator("#stdout")).to_have_text("Hello, Ada! x\n")
    page.fill("#code", "edited")
    page.select_option("#interpreter", "bash")
    expect(page.locator("#code")).to_have_value("edited")  # the user's own code is never replaced


def test_a_compile_error_reads_as_one(page):
    page.goto("/")
    page.select_option("#interpreter", "c")
    expect(page.locator("#language")).to_contain_text("gcc -std=gnu17")
    page.fill("#code", "int main(void) { return nope; }\n")
    page.click("#run")
    expect(page.locator("#status")).to_have_text("Failed: did not compile (exit code 1)", timeout=60_000)
    expect(page.locator("#stderr")).to_contain_text("nope")


def test_a_bad_manifest_shows_the_servers_400(page):
    page.goto("/")
    page.fill("#memory", "1")
    page.click("#run")
    expect(page.locator("#status")).to_contain_text("400", timeout=30_000)
    expect(page.locator("#status")).to_have_class("error")


def test_files_mode_runs_the_chosen_entrypoint(page, tmp_path):
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "helper.py").write_text("WORD = 'from a helper'\n")
    (tmp_path / "proj" / "main.py").write_text("from helper import WORD\nprint(WORD)\n")
    page.goto("/")
    page.click("#tab-files")
    page.set_input_files("#pick", [str(tmp_path / "proj" / "helper.py"), str(tmp_path / "proj" / "main.py")])
    expect(page.locator("#entrypoint")).to_have_value("main.py")
    page.click("#run")
    expect(page.locator("#status")).to_have_text("Completed", timeout=30_000)
    expect(page.locator("#stdout")).to_have_text("from a helper\n")


def test_the_page_fits_a_phone(browser, server):
    context = browser.new_context(base_url=f"http://127.0.0.1:{server.port}", viewport={"width": 390, "height": 844}, is_mobile=True)
    try:
        page = context.new_page()
        page.goto("/")
        expect(page.locator("#interpreter")).to_have_value("python3")
        assert page.evaluate("document.scrollingElement.scrollWidth") <= 390  # nothing wider than the screen
        assert page.locator("#run").bounding_box()["width"] > 0
    finally:
        context.close()
