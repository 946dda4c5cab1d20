"""Make the viewer screenshots in docs/img/viewer-*.png from the demo run (cwm_rl/viewer/demo.py, real tokenizer).

    .venv/bin/python tests/cwm_rl/viewer/screenshots.py        # about 20 s; needs chromium and playwright

Not a test (pytest collects test_*.py only): run it after changing the page, and look at the images.
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

from cwm_rl.replay.results import AnalysisStore
from cwm_rl.store import RolloutStore
from cwm_rl.viewer.demo import build_demo
from cwm_rl.viewer.server import ViewerServer

OUT = Path(__file__).resolve().parents[3] / "docs" / "img"
MAX_BYTES = 200_000


def save(png: bytes, name: str) -> None:
    """Palette PNG (UI colours survive 256 of them), so each image stays well under MAX_BYTES."""
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    path = OUT / f"viewer-{name}.png"
    image.save(path, optimize=True)
    size = path.stat().st_size
    print(f"{path} {size / 1000:.0f} KB")
    if size > MAX_BYTES:
        sys.exit(f"{path} is {size} bytes, over {MAX_BYTES}: make the viewport smaller")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    run = build_demo(Path(tempfile.mkdtemp()) / "demo", num_steps=14, group_size=4, tokenizer=True)
    with RolloutStore(run, readonly=True) as store:
        trained = store.query(status="trained", order="-stored")
        groups = {}
        for r in trained:
            groups.setdefault(r.group_id, []).append(r.return_)
        mixed = next(g for g, rs in groups.items() if len(set(rs)) > 1 and len(rs) == 4)
        multi = next((r for r in trained if r.num_turns > 1 and abs(store.training(r.trajectory_id).advantage) > 0.1),
                     next(r for r in trained if r.num_turns > 1))
    with AnalysisStore(run, readonly=True) as results:
        diverged = next(r for r in results.replays() if not r.identical)
        rescore = results.rescore_sets()[0]
        branch = results.branch_sets()[0]
    with ViewerServer(run) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1360, "height": 860})

        def show(hash_: str, view: str) -> None:
            page.mouse.move(0, 0)
            page.goto(f"{url}/#{hash_}")
            page.wait_for_selector(f"main[data-ready][data-view={view}]")
            page.wait_for_timeout(300)

        show("/", "run")
        save(page.screenshot(), "list")
        show(f"/r/demo/t/{multi.trajectory_id}?color=logprob", "trajectory")
        page.locator("#turn-0").scroll_into_view_if_needed()
        page.evaluate("window.scrollBy(0, -150)")
        token = page.locator("#turn-0 .tok[data-value^='-']").nth(7)
        token.hover()
        save(page.screenshot(), "trajectory")
        page.click(".modes button[data-mode=mismatch]")
        token.hover()
        save(page.screenshot(), "mismatch")
        show(f"/r/demo/g/{mixed}", "group")
        save(page.screenshot(), "group")
        show(f"/r/demo/t/{diverged.trajectory_id}", "trajectory")
        page.locator("section.analysis").scroll_into_view_if_needed()
        save(page.locator("section.analysis").screenshot(), "replay")
        show(f"/r/demo/rescore/{rescore.rescore_id}", "rescore")
        save(page.screenshot(), "rescore")
        show(f"/r/demo/branch/{branch.branch_id}", "branch")
        save(page.screenshot(), "branch")
        browser.close()


if __name__ == "__main__":
    main()
