"""The report in a real browser: Debian's Chromium, headless, driven by Playwright.

`make test` installs Chromium when it is missing and it can (root and apt-get); otherwise this
test skips and says why. Screenshots are kept under artifacts/test-artifacts/.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO
from coordinator.launch.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
INSTALL_LOG = REPO / ".venv" / "chromium-install.log"
SCREENSHOTS = REPO / "artifacts" / "test-artifacts"
# The machine's network is closed: without these Chromium keeps dialling out and logs refusals.
CHROMIUM_ARGS = [
    "--no-sandbox",  # as root (CI) Chromium refuses to start sandboxed
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LAPTOP = {"width": 1366, "height": 768}
NARROW = {"width": 800, "height": 1000}


def _why_no_browser() -> str | None:
    if CHROMIUM is None:
        why = "chromium is not installed (Debian package 'chromium')"
        if INSTALL_LOG.exists():
            last = [line for line in INSTALL_LOG.read_text(errors="replace").splitlines() if line.strip()]
            why += f"; make test tried to install it and failed: {last[-1] if last else 'no output'} ({INSTALL_LOG})"
        else:
            why += "; make test installs it with apt-get when run as root, which this run was not"
        return why
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (the dev extra: pip install -e '.[dev]')"
    return None


pytestmark = pytest.mark.skipif(_why_no_browser() is not None, reason=str(_why_no_browser()))


@pytest.fixture(scope="module")
def browser() -> Any:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def reports(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A faulted run, a sweep and an ablation, and one page holding all three."""
    root = tmp_path_factory.mktemp("browser")
    run_dir = root / "run"
    argv = ["simulate", "--model", str(tiny_model), "--fragments", "3", "--order", "random", "--seed", "2"]
    argv += ["--threads", "1", "--max-new-tokens", "4", "--run-dir", str(run_dir), "--kill", "1@0.5", "--respawn"]
    assert main(argv) == 0
    sweep = root / "sweep"
    argv = ["sweep", "--model", str(tiny_model), "--fragments", "2,3", "--trials", "2", "--max-new-tokens", "4"]
    assert main([*argv, "--threads", "1", "--out", str(sweep)]) == 0
    ablation = root / "ablation.json"
    assert main(["ablate", "--model", str(tiny_model), "--threads", "1", "--out", str(ablation)]) == 0
    combined = root / "all.html"
    assert main(["report", str(run_dir), str(sweep), str(ablation), "--out", str(combined)]) == 0
    return {
        "run": run_dir / "report.html",
        "sweep": sweep / "report.html",
        "ablation": ablation.with_suffix(".html"),
        "combined": combined,
    }


def _open(browser: Any, path: Path, viewport: dict[str, int]) -> tuple[Any, list[str]]:
    page = browser.new_page(viewport=viewport)
    problems: list[str] = []
    page.on(
        "console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None
    )
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("requestfailed", lambda req: problems.append(f"request failed: {req.url}"))
    page.on(
        "request",
        lambda req: None if req.url.startswith(("file:", "data:")) else problems.append(f"request: {req.url}"),
    )
    page.goto(path.as_uri(), wait_until="load")
    return page, problems


def _figure_sizes(page: Any) -> list[dict[str, Any]]:
    return page.eval_on_selector_all(
        "figure",
        """els => els.map(f => { const s = f.querySelector('svg'); const r = s ? s.getBoundingClientRect() : null;
            return {name: f.dataset.figure, width: r ? r.width : 0, height: r ? r.height : 0}; })""",
    )


@pytest.mark.parametrize("kind", ["run", "sweep", "ablation", "combined"])
def test_report_renders_without_console_errors_and_every_figure_has_a_size(
    browser: Any, reports: dict[str, Path], kind: str
) -> None:
    page, problems = _open(browser, reports[kind], LAPTOP)
    sizes = _figure_sizes(page)
    assert sizes, "the page has figures"
    for fig in sizes:
        assert fig["width"] > 200 and fig["height"] > 100, fig
    assert problems == []
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / f"report-{kind}.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    page.close()


def test_report_fits_a_narrow_window_without_sideways_scrolling(browser: Any, reports: dict[str, Path]) -> None:
    page, problems = _open(browser, reports["run"], NARROW)
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"{overflow}px wider than the window"
    for fig in _figure_sizes(page):
        assert fig["width"] <= NARROW["width"], fig
    assert problems == []
    page.close()


def test_report_prints_every_figure(browser: Any, reports: dict[str, Path], tmp_path: Path) -> None:
    page, problems = _open(browser, reports["combined"], LAPTOP)
    page.emulate_media(media="print")
    sizes = _figure_sizes(page)
    assert all(fig["width"] > 200 and fig["height"] > 100 for fig in sizes), sizes
    pdf = tmp_path / "report.pdf"
    page.pdf(path=str(pdf), format="A4")
    assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 20_000
    assert problems == []
    page.close()
