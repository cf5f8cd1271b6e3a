"""The report opens in headless Chromium without console errors, and its figures are drawn (not blank).

Skipped when `/usr/bin/chromium` is absent (Debian: `apt-get install -y chromium`).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from tests.report_data import make_runs

from alignkit.report import run as run_report

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium)")


def screenshot(page: Path, out: Path, tmp_path: Path) -> str:
    """Load `page` in headless Chromium, save a screenshot to `out`; return Chromium's log (stderr)."""
    args = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2600",
            f"--screenshot={out}", "--enable-logging=stderr", "--v=0", page.resolve().as_uri()]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.is_file(), f"no screenshot; chromium said:\n{proc.stderr[-2000:]}"
    return proc.stderr


def console_errors(log: str) -> list[str]:
    """Console messages and failed loads in Chromium's log (the report has no scripts, so any is an error)."""
    return [line for line in log.splitlines() if "CONSOLE" in line or "net::ERR" in line]


def colored_pixels(png: Path) -> int:
    """Pixels of clearly saturated colour: plot lines and markers (the page's text is black and grey)."""
    from matplotlib import image

    rgb = image.imread(str(png))[..., :3]
    spread = rgb.max(axis=-1) - rgb.min(axis=-1)
    return int((spread > 0.3).sum())


def test_console_check_detects_errors(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><p>x</p><script>console.error('deliberate failure')</script></body></html>")
    assert console_errors(screenshot(bad, tmp_path / "bad.png", tmp_path))


def test_report_renders_without_errors_and_with_plots(tmp_path):
    cfg = make_runs(tmp_path)
    cfg.run.output_dir = str(tmp_path / "demo" / "report")
    page = Path(run_report(cfg)["report"])
    shot = tmp_path / "report.png"
    log = screenshot(page, shot, tmp_path)
    assert console_errors(log) == []
    assert colored_pixels(shot) > 5000, "the figures look blank"
    blank = tmp_path / "blank.html"
    blank.write_text(page.read_text().split("<h2>Gold reward")[0] + "</main></body></html>")
    screenshot(blank, tmp_path / "blank.png", tmp_path)
    assert colored_pixels(tmp_path / "blank.png") < 0.2 * colored_pixels(shot)
