"""The viewer page in a real headless browser (Debian's chromium driven by playwright) against a real uvicorn server
over a demo run with a real tokenizer: pages load, filters work, token colours match the stored numbers through the
documented colour functions (static/colors.js), links reload the same view, a live run's new rows appear.

Needs `apt-get install -y chromium` and `pip install playwright` (playwright's own browser download is not used)."""

from __future__ import annotations

import math
import random
import shutil
import threading
import time
from pathlib import Path

import pytest

from cwm_rl.store import RolloutStore
from cwm_rl.viewer.demo import Tokens, build_demo, make_group
from cwm_rl.viewer.server import ViewerServer

CHROMIUM = "/usr/bin/chromium"
RUN = "demo"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return build_demo(tmp_path_factory.mktemp("browser") / RUN, num_steps=10, tokenizer=True)


@pytest.fixture(scope="module")
def url(run_dir):
    with ViewerServer(run_dir) as address:
        yield address


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser tests need playwright: .venv/bin/pip install 'playwright>=1.45,<2'")
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.fail("the browser tests need Debian's chromium: apt-get install -y chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def page(browser, url):
    context = browser.new_context(viewport={"width": 1400, "height": 900}, base_url=url)
    context.set_default_timeout(10_000)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def open_view(page, hash_: str, view: str):
    page.goto("/#" + hash_)
    page.wait_for_selector(f"main[data-ready][data-view={view}]", timeout=15_000)


def listed_ids(page) -> list[str]:
    return page.eval_on_selector_all("table.list tbody tr", "rows => rows.map(r => r.dataset.id)")


def test_list_page_loads_with_curves_and_counts(page, run_dir):
    open_view(page, "/", "run")  # a single run opens directly
    with RolloutStore(run_dir, readonly=True) as store:
        newest = [r.trajectory_id for r in store.query(order="-stored", limit=50)]
        total = store.count()
    assert listed_ids(page) == newest
    assert page.locator(".counts .total b").inner_text().replace(",", "") == str(total)
    assert page.locator("figure.chart[data-metric=reward_mean] polyline").count() == 1
    page.wait_for_function(f"document.querySelector('#match-count').textContent.startsWith('{total}')")


def test_filters_narrow_the_list(page, run_dir):
    open_view(page, f"/r/{RUN}", "run")
    page.select_option("select[name=env]", "cwm_rl/Math-v0")
    page.wait_for_selector("main[data-ready][data-view=run]")
    page.select_option("select[name=status]", "trained")
    page.wait_for_selector("main[data-ready][data-view=run]")
    page.fill("input[name=min_return]", "1")
    page.click("button.primary")
    page.wait_for_function("location.hash.includes('min_return=1')")
    page.wait_for_selector("main[data-ready][data-view=run]")
    with RolloutStore(run_dir, readonly=True) as store:
        expected = [r.trajectory_id for r in store.query(env="cwm_rl/Math-v0", status="trained", min_return=1.0, order="-stored", limit=50)]
        assert 0 < len(expected) < store.count(env="cwm_rl/Math-v0")
    assert listed_ids(page) == expected
    # The filtered list is a link: a fresh page on the same URL shows the same rows.
    link = page.url
    page.goto("about:blank")
    page.goto(link)
    page.wait_for_selector("main[data-ready][data-view=run]")
    assert listed_ids(page) == expected
    assert page.input_value("select[name=status]") == "trained"


def test_text_search(page, run_dir):
    open_view(page, f"/r/{RUN}?q=try%20again", "run")
    with RolloutStore(run_dir, readonly=True) as store:
        expected = [r.trajectory_id for r in store.query(order="-stored")
                    if any("try again" in m.content.lower() for m in store.get(r.trajectory_id).messages)][:50]
    assert expected and listed_ids(page) == expected
    assert "searched" in page.inner_text(".search-note")


def _colour(mode: str, value):
    """The documented colour functions of static/colors.js, in Python: value -> 'rgb(r, g, b)' or no colour."""
    red, blue, green, orange = (229, 57, 53), (30, 136, 229), (67, 160, 71), (251, 140, 0)
    palette = [(144, 202, 249), (255, 204, 128), (165, 214, 167), (239, 154, 154), (206, 147, 216), (128, 222, 234),
               (255, 245, 157), (188, 170, 164)]

    def mix(end, t):
        t = min(1.0, max(0.0, t))
        return tuple(math.floor(255 + (c - 255) * t + 0.5) for c in end)

    if value is None:
        return None
    rgb = {"logprob": lambda v: mix(red, -v / 5), "trainer_logprob": lambda v: mix(red, -v / 5),
           "mismatch": lambda v: mix(red if v >= 0 else blue, abs(v) / 0.5),
           "version": lambda v: palette[v % 8], "is_weight": lambda v: mix(orange if v >= 1 else blue, abs(math.log2(max(v, 1e-9))) / 2),
           "advantage": lambda v: mix(green if v >= 0 else red, abs(v) / 2),
           "loss_mask": lambda v: (200, 230, 201) if v else (224, 224, 224)}[mode](value)
    return rgb


def _stored_values(store: RolloutStore, trajectory_id: str) -> dict[str, list]:
    t = store.get(trajectory_id)
    record = store.training(trajectory_id)
    per = record.per_token(t)
    gen = [m == 1 for m in t.loss_mask]
    return {"logprob": [lp if g else None for lp, g in zip(t.logprobs, gen)], "trainer_logprob": per["trainer_logprob"],
            "mismatch": [None if tl is None else tl - lp for tl, lp in zip(per["trainer_logprob"], t.logprobs)],
            "version": [v if g else None for v, g in zip(t.policy_versions, gen)], "is_weight": per["is_weight"],
            "advantage": [record.advantage if g else None for g in gen], "loss_mask": list(t.loss_mask)}


def test_token_colours_match_the_stored_numbers(page, run_dir):
    with RolloutStore(run_dir, readonly=True) as store:
        row = next(r for r in store.query(status="trained", order="-stored") if r.num_turns > 1)
        values = _stored_values(store, row.trajectory_id)
        text = store.get(row.trajectory_id).turns[0].action
    open_view(page, f"/r/{RUN}/t/{row.trajectory_id}", "trajectory")
    shown_text = page.inner_text(".turn#turn-0 .tokens").replace("↵", "")  # newline tokens are marked with ↵
    assert text in shown_text  # real tokenizer text, in order
    checked = 0
    for mode in values:
        page.click(f".modes button[data-mode={mode}]")
        page.wait_for_function(f"location.hash.endsWith('color={mode}')")
        shown = page.eval_on_selector_all(".tok", "els => els.map(e => [+e.dataset.i, getComputedStyle(e).backgroundColor])")
        assert len(shown) == len(values[mode])
        for i, css in shown:
            want = _colour(mode, values[mode][i])
            if want is None:
                assert css == "rgba(0, 0, 0, 0)", (mode, i)
            else:
                got = tuple(int(x) for x in css[css.index("(") + 1:-1].split(","))
                # +-1: the browser's log2 may differ from libm's in the last bit (a rounding tie in IS weights)
                assert all(abs(a - b) <= 1 for a, b in zip(got, want)), (mode, i, values[mode][i], css, want)
                checked += 1
    assert checked > 100
    # Hover shows the numbers of that token.
    i = next(k for k, m in enumerate(values["loss_mask"]) if m)
    page.hover(f".tok[data-i='{i}']")
    tip = page.inner_text("#tip")
    assert f"#{i}" in tip and "behaviour logprob" in tip and "IS weight" in tip
    assert f"{values['logprob'][i]:.6g}".rstrip("0") in tip


def test_shared_link_reopens_the_colour_choice(page, run_dir):
    with RolloutStore(run_dir, readonly=True) as store:
        row = store.query(status="trained", limit=1)[0]
    open_view(page, f"/r/{RUN}/t/{row.trajectory_id}?color=is_weight", "trajectory")
    assert page.get_attribute(".modes button.on", "data-mode") == "is_weight"


def test_unknown_id_and_page_show_a_clear_message(page):
    open_view(page, f"/r/{RUN}/t/0123456789abcdef", "error")
    assert "no trajectory with id or id prefix '0123456789abcdef'" in page.inner_text("[role=alert]")
    open_view(page, "/r/no-such-run", "error")
    assert "no run named 'no-such-run'" in page.inner_text("[role=alert]")


def test_group_and_results_pages(page, run_dir):
    with RolloutStore(run_dir, readonly=True) as store:
        row = store.query(status="trained", min_return=1.0, limit=1)[0]
        members = store.query(group=row.group_id, order="stored")
        advantages = {r.trajectory_id: store.training(r.trajectory_id).advantage for r in members}
    open_view(page, f"/r/{RUN}/g/{row.group_id}", "group")
    shown = page.eval_on_selector_all(".sample", "els => els.map(e => [e.dataset.id, +e.querySelector('[data-advantage]').dataset.advantage])")
    assert dict(shown) == advantages
    open_view(page, f"/r/{RUN}/analysis", "analysis")
    page.click("table.list >> nth=0 >> tbody tr >> nth=0 >> a")  # the rescore set
    page.wait_for_selector("main[data-ready][data-view=rescore]")
    assert page.locator("tr.flipped").count() > 0
    page.goto(page.url.split("#")[0] + f"#/r/{RUN}/analysis")
    page.wait_for_selector("main[data-ready][data-view=analysis]")
    page.click("table.list >> nth=1 >> tbody tr >> nth=0 >> td >> nth=0 >> a")
    page.wait_for_selector("main[data-ready][data-view=branch]")
    assert page.locator(".samples .sample").count() == 5  # the original and 4 continuations


def test_model_text_is_shown_as_text_never_markup(page, run_dir):
    rng = random.Random(5)
    group = make_group(rng, Tokens(), env_id="cwm_rl/Math-v0", index=999, version=3, group_size=1, skill=0.0)
    t = group[0]
    markup = '<img src=x onerror="document.body.dataset.pwned=1"><script>window.pwned=1</script>'
    t.turns[0].action = markup
    t.turns[0].observation[0].content = f"env says {markup}"
    with RolloutStore(run_dir) as store:
        store.add(t)
    for view, hash_ in (("trajectory", f"/r/{RUN}/t/{t.trajectory_id}"), ("group", f"/r/{RUN}/g/{t.group_id}")):
        open_view(page, hash_, view)
        assert f"env says {markup}" in page.inner_text("main")
        if view == "group":
            assert markup in page.inner_text("pre.action")
        assert page.locator("main img, main script").count() == 0 and page.evaluate("document.body.dataset.pwned") is None


def test_a_live_run_updates_the_open_page(page, run_dir):
    open_view(page, f"/r/{RUN}", "run")
    before = set(listed_ids(page))
    rng = random.Random(7)
    added: list[str] = []

    def job():  # what a training job does meanwhile: store finished groups
        with RolloutStore(run_dir) as store:
            for k in range(3):
                g = make_group(rng, Tokens(), env_id="cwm_rl/Code-v0", index=500 + k, version=20, group_size=2, skill=0.5)
                store.add(g)
                added.extend(t.trajectory_id for t in g)
                time.sleep(0.5)

    writer = threading.Thread(target=job)
    writer.start()
    writer.join()
    page.wait_for_function("ids => ids.every(id => document.querySelector(`tr[data-id='${id}']`))", arg=added, timeout=15_000)
    top = listed_ids(page)[:len(added)]
    assert set(top) == set(added) and not set(top) & before
    assert page.locator("tr.new").count() >= len(added)
