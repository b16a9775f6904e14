"""Open the rendered report in headless Chromium: no console errors, no injected script runs, every chart drawn.

Needs Debian's ``chromium`` and ``chromium-driver`` (CI installs them); skipped with the reason otherwise.
Set ``DISTILLGATE_SCREENSHOT_DIR`` to keep the full-page screenshot (it always goes to the test's tmp folder).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from distillgate.report import render_report
from distillgate.report.sample import synthetic_report

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="headless browser test needs `chromium` and `chromedriver` on PATH "
           "(Debian: apt-get install -y chromium chromium-driver)")

# An injected payload that would set a flag if any user string reached the page unescaped.
PAYLOAD = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'

# Per chart: an SVG root and something drawn (line/area/bar paths with geometry, or a heat map's image).
DRAWN_JS = """
return Array.from(document.querySelectorAll('.plotly-graph-div')).map(div => ({
  id: div.id,
  svg: div.querySelectorAll('svg.main-svg').length,
  paths: Array.from(div.querySelectorAll('.trace path')).filter(p => (p.getAttribute('d') || '').length > 4).length,
  images: div.querySelectorAll('.hm image, image.hm').length,
  polar: div.querySelectorAll('.polar').length,
  width: div.getBoundingClientRect().width,
}));
"""


def _driver(user_dir: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
              f"--user-data-dir={user_dir}", "--window-size=1400,1000"):
        opts.add_argument(a)
    opts.binary_location = CHROMIUM
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def test_report_renders_in_headless_chromium(tmp_path):
    pytest.importorskip("selenium", reason="selenium is a test extra (pip install -e '.[test]')")
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.support.ui import WebDriverWait

    data = synthetic_report(n_iterations=3)
    data.findings[0].message = f"regression {PAYLOAD}"
    data.findings[0].evidence.heatmaps[0].y[0] = PAYLOAD  # a domain name drawn by plotly
    data.run.summary = PAYLOAD
    page = render_report(data, tmp_path / "report.html")

    t0 = time.perf_counter()
    driver = _driver(tmp_path / "chromium-profile")
    try:
        driver.get(page.resolve().as_uri())
        WebDriverWait(driver, 30).until(
            lambda d: d.execute_script("return document.querySelectorAll('.plotly-graph-div').length > 0 && "
                                       "Array.from(document.querySelectorAll('.plotly-graph-div'))"
                                       ".every(g => g.querySelector('svg.main-svg'))"))
        charts = driver.execute_script(DRAWN_JS)
        xss = driver.execute_script("return window.__xss === undefined ? null : window.__xss")
        with pytest.raises(NoAlertPresentException):
            driver.switch_to.alert.text  # noqa: B018 (an alert would mean a script ran)
        logs = driver.get_log("browser")
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1400, min(height + 40, 16000))
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    elapsed = time.perf_counter() - t0

    keep = os.environ.get("DISTILLGATE_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "report.png")
    assert xss is None, f"injected markup executed (window.__xss={xss})"
    errors = [e for e in logs if e["level"] == "SEVERE"]
    assert not errors, f"console errors: {errors}"
    assert len(charts) == 9, charts
    for c in charts:
        assert c["svg"] >= 1 and c["width"] > 100, c
        assert c["paths"] + c["images"] > 0, f"chart {c['id']} has nothing drawn: {c}"
    radar = [c for c in charts if c["polar"]]
    assert len(radar) == 1 and radar[0]["paths"] >= 2, charts  # threshold ring + at least one iteration
    assert sum(c["images"] > 0 for c in charts) == 5  # heat maps: overview + 2 transitions + 2 finding maps
    assert shot.stat().st_size > 50_000
    assert elapsed < 60, f"browser check took {elapsed:.1f} s"
