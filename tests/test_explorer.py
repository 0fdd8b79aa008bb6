"""The explorer page: the builder in Python, then the page in headless Chromium.

The Python half needs no browser: the embedded data equals the records, text is escaped, the
size of a 1,000-step trace, the two commands that write a page. The browser half opens the
page from file:// in Debian's `chromium` through selenium and `chromedriver`: one token element
per generated token with the trace's data, a click shows that step's table with its rank and
u, a prompt holding <script> stays text, a screenshot that is not blank, a phone width without
sideways scrolling. Without Chromium these skip, saying why (CI installs it: .ci/run).

This file is also the command that makes the README's picture, by the same code path:
    python tests/test_explorer.py PAGE.html PICTURE.png [--select=SAMPLE:STEP] [--width=1280]
"""

import json
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import run_python
from nanosample import explain, explorer
from nanosample.generate import generate
from nanosample.sampling import SamplingParams

PARAMS = [SamplingParams(temperature=1.3, top_k=12, top_p=0.9),
          SamplingParams(temperature=0),
          SamplingParams(temperature=1.0, min_p=0.05, repetition_penalty=1.3, logit_bias=((0, 1.5),))]
RUN = {"prompt": "the ", "seed": 5, "model": "tiny"}


def trace_records(model, tokenizer, params=PARAMS, max_new_tokens=30, top=10):
    """The records of one run of the tiny model (conftest), as --explain_file writes them."""
    records = []

    def trace(step):  # what Explainer does for --explain_file, less the writing
        rows = [r for r, active in enumerate(step.active) if active]
        records.extend(explain.explain_rows(step, tokenizer, rows, top))

    list(generate(model, tokenizer, tokenizer.encode(RUN["prompt"]), params=params,
                  num_samples=len(params), seed=RUN["seed"], max_new_tokens=max_new_tokens,
                  trace=trace))
    return records


@pytest.fixture(scope="module")
def records(model, tokenizer):
    return trace_records(model, tokenizer)


def embedded(page):
    """The JSON object a page embeds."""
    m = re.search(r'<script type="application/json" id="trace-data">(.*?)</script>', page, re.S)
    return json.loads(m.group(1))


def rows_as_records(data):
    """The page's rows back as dicts: {(sample, step): record with the kept keys}."""
    out = {}
    for row in data["records"]:
        r = dict(zip(data["record_fields"], row))
        r["settings"] = data["settings"][r["settings"]]
        r["candidates"] = [dict(zip(data["candidate_fields"], c)) for c in r["candidates"]]
        out[r["sample"], r["step"]] = r
    return out


def chosen_q(record):
    return next(c["q"] for c in record["candidates"] if c["chosen"])


# ---------------------------------------------------------------------------------------------
# The builder, without a browser

def test_page_data_equals_the_records(records):
    data = embedded(explorer.build_html(records, RUN))
    assert data["run"] == RUN and data["candidates_per_step"] == 20   # 90 steps: all of them
    assert data["most_candidates_in_trace"] == 11   # top 10, and a chosen token beyond them
    page = rows_as_records(data)
    assert len(page) == len(records) == 30 * len(PARAMS)
    for r in records:
        p = page[r["sample"], r["step"]]
        for field in explorer.RECORD_FIELDS[:-1]:
            assert p[field] == r[field], field     # exact: floats at full precision
        assert p["candidates"] == [{f: c[f] for f in explorer.CANDIDATE_FIELDS}
                                   for c in r["candidates"]]
    assert len(data["settings"]) == 3   # one entry per distinct settings, shared by the steps


def test_long_runs_keep_the_first_candidates_and_the_chosen_one(records):
    assert [explorer.candidates_per_step(n) for n in (1, 500, 1000, 1001, 2000, 10**6)] == \
        [20, 20, 10, 9, 5, 3]
    page = rows_as_records(explorer.page_data(records, max_candidates=3))
    late = [r for r in records if r["chosen_rank"] > 3]
    assert late, "the tiny run has chosen tokens beyond rank 3 (temperature 1.3)"
    for r in records:
        kept = [c["rank"] for c in page[r["sample"], r["step"]]["candidates"]]
        expected = [1, 2, 3] + ([r["chosen_rank"]] if r["chosen_rank"] > 3 else [])
        assert kept == expected


def test_every_token_text_is_escaped(records):
    evil = '</script><script>window.pwned = 1</script><!-- & \u2028\u2029 >'
    records = [dict(r) for r in records[:4]]
    records[0] = dict(records[0], chosen_text=evil, candidates=[
        dict(c, text=evil if c["chosen"] else c["text"]) for c in records[0]["candidates"]])
    page = explorer.build_html(records, {"prompt": "<script>alert(1)</script>", "seed": 1})
    assert page.count("<script") == 2 and page.count("</script>") == 2   # ours, no more
    assert "\u2028" not in page and "\u2029" not in page and "<!--" not in page
    data = embedded(page)
    assert data["run"]["prompt"] == "<script>alert(1)</script>"
    row = rows_as_records(data)[records[0]["sample"], records[0]["step"]]
    assert row["chosen_text"] == evil
    assert evil in [c["text"] for c in row["candidates"]]


def test_only_the_pages_own_script_may_run(records):
    import base64
    import hashlib

    page = explorer.build_html(records, RUN)
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1)
    script = re.search(r"<script>(.*)</script>", page, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp and "default-src 'none'" in csp
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page   # no CDN, no font, nothing fetched


def test_a_1000_step_trace_is_under_2_mb(model, tokenizer):
    records = trace_records(model, tokenizer, params=[SamplingParams(temperature=1.0)],
                            max_new_tokens=1000, top=10)
    assert len(records) == 1000
    page = explorer.build_html(records, RUN)
    size = len(page.encode("utf-8"))
    print(f"1,000 steps, 10 candidates each: {size / 1e6:.2f} MB")
    assert embedded(page)["candidates_per_step"] == 10   # no cap at 1,000 steps
    assert size < 2_000_000


def test_two_steps_for_one_sample_is_an_error(records):
    with pytest.raises(ValueError, match="sample 0 step 0 appears twice"):
        explorer.page_data(records + records[:1])
    with pytest.raises(ValueError, match="no records"):
        explorer.page_data([])


def test_browser_tests_say_why_they_skip(monkeypatch):
    monkeypatch.setenv("PATH", "")
    assert chromium_paths() == (None, "needs Debian's chromium and chromium-driver (apt-get "
                                      "install chromium chromium-driver); .ci/run installs them")


# ---------------------------------------------------------------------------------------------
# The two commands

def test_explain_module_writes_the_page_of_a_jsonl_trace(records, tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                     encoding="utf-8")
    page = tmp_path / "run.html"
    code, out, err = run_python("-m", "nanosample.explain", str(trace), f"--html={page}",
                                "--start=the ", "--seed=5")
    assert code == 0, err
    assert re.fullmatch(r"wrote .*run\.html: 90 steps, 0\.\d\d MB\n", err)
    assert page.read_text(encoding="utf-8") == explorer.build_html(
        records, {"prompt": "the ", "seed": 5})
    code, out, err = run_python("-m", "nanosample.explain", str(trace), f"--html={page}")
    assert (code, out) == (2, "") and err.startswith(f"error: --html={page}: the file exists")

    kept = page.read_text(encoding="utf-8")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(records[0]) + "\n{not json\n", encoding="utf-8")
    for args, message in [
            ([str(trace), f"--html={page}"], f"--html={page}: the file exists; choose another "
                                             f"path, or add --overwrite to replace it"),
            ([str(tmp_path / "none.jsonl"), f"--html={tmp_path / 'x.html'}"],
             f"{tmp_path / 'none.jsonl'}: no such file"),
            ([str(bad), f"--html={tmp_path / 'x.html'}"], f"{bad}: line 2: not JSON"),
            ([str(trace), f"--html={tmp_path / 'no' / 'x.html'}"],
             f"--html={tmp_path / 'no' / 'x.html'}: the directory {tmp_path / 'no'} does not exist"),
            ([str(trace), f"--html={trace}"], f"--html={trace}: the same file as the trace"),
            ([str(trace)], "--html: needed"),
            ([str(trace), "--html=x.html", "--colour=red"], "--colour: unknown flag"),
            ([str(trace), "--html=x.html", "--seed=-1"], "--seed=-1: must be an integer >= 0")]:
        code = explain.main(args)        # what python -m nanosample.explain runs
        out, err = capsys.readouterr()
        assert code == 2 and out == "", (args, err)
        assert err.startswith("error: " + message) and err.count("\n") == 1, (args, err)
    assert page.read_text(encoding="utf-8") == kept   # nothing a user wrote is replaced
    assert not (tmp_path / "x.html").exists()


@pytest.mark.slow
def test_sample_py_html_flag(tmp_path):
    page, trace = tmp_path / "run.html", tmp_path / "run.jsonl"
    common = ["sample.py", "--start=ROMEO:", "--num_samples=2", "--max_new_tokens=5", "--seed=3"]
    code, out, err = run_python(*common, f"--html={page}", f"--explain_file={trace}")
    assert code == 0, err
    data = embedded(page.read_text(encoding="utf-8"))
    assert data["run"] == {"prompt": "ROMEO:", "seed": 3, "model": "shakespeare_char"}
    records = explorer.read_trace(trace)
    assert rows_as_records(data) == rows_as_records(explorer.page_data(records))
    texts = out.split("\n---------------\n")[:2]
    for sample, text in enumerate(texts):
        steps = sorted((r for r in records if r["sample"] == sample), key=lambda r: r["step"])
        assert text == "ROMEO:" + "".join(r["chosen_text"] for r in steps)

    kept = page.read_bytes()
    cases = [
            ([f"--html={page}"], f"--html={page}: the file exists; choose another path, or add "
                                 f"--overwrite to replace it"),
            ([f"--html={trace}", f"--explain_file={trace}", "--overwrite"],
             f"--html={trace}: the same file as --explain_file"),
            ([f"--html={tmp_path}"], f"--html={tmp_path}: is a directory"),
            (["--html="], "--html=''")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda case: run_python(*common, *case[0]), cases))
    for (args, message), (code, out, err) in zip(cases, results):
        assert code == 2 and out == "", (args, err)
        assert err.startswith("error: " + message) and err.count("\n") == 1, (args, err)
    assert page.read_bytes() == kept


# ---------------------------------------------------------------------------------------------
# The page in a real browser

def chromium_paths():
    """(browser, driver) executables, or the reason they cannot be used."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        return None, ("needs Debian's chromium and chromium-driver (apt-get install chromium "
                      "chromium-driver); .ci/run installs them")
    try:
        import selenium  # noqa: F401
    except ModuleNotFoundError:
        return None, "needs selenium (pip install -e '.[test]')"
    return (browser, driver), None


def open_browser(width=1280, height=860, scale=1):
    """Headless Chromium through chromedriver, with a window of width x height CSS pixels."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    (browser, driver), reason = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--hide-scrollbars", f"--window-size={width},{height + 200}", "--lang=en-US"):
        options.add_argument(arg)
    # An explicit driver: selenium's own driver manager would look for one on the network.
    b = webdriver.Chrome(service=Service(driver), options=options)
    # The viewport exactly (the window's own size includes its frame); narrow means a phone.
    b.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": scale, "mobile": width < 600})
    return b


def load(browser, path):
    """Open a page file and wait until its script has drawn it."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(Path(path).resolve().as_uri())
    WebDriverWait(browser, 20).until(
        lambda b: b.execute_script("return document.body.dataset.ready === 'true'"))


def click_token(browser, sample, step):
    from selenium.webdriver.common.by import By

    token = browser.find_element(By.CSS_SELECTOR, f'.tok[data-sample="{sample}"][data-step="{step}"]')
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", token)
    token.click()
    return token


def screenshot(page, picture, width=1280, height=860, select=None, scale=1):
    """Open `page` at this window size, click token `select` = (sample, step) if given, and
    save the window as a PNG. The README's picture is made with this (see the docstring)."""
    browser = open_browser(width, height, scale)
    try:
        load(browser, page)
        if select is not None:
            click_token(browser, *select)
            browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(str(picture))
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def browser():
    paths, reason = chromium_paths()
    if paths is None:
        pytest.skip(reason)
    b = open_browser()
    yield b
    b.quit()


@pytest.fixture(scope="module")
def page(records, tmp_path_factory):
    path = tmp_path_factory.mktemp("explorer") / "run.html"
    explorer.write_html(records, path, RUN)
    return path


def test_one_token_element_per_generated_token(browser, page, records):
    load(browser, page)
    shown = browser.execute_script("""
        return [...document.querySelectorAll('.tok')].map(e =>
            [+e.dataset.sample, +e.dataset.step, +e.dataset.id, e.dataset.q, e.textContent]);""")
    assert len(shown) == len(records)
    expected = sorted(records, key=lambda r: (r["sample"], r["step"]))
    for (sample, step, token, q, text), r in zip(shown, expected):
        assert (sample, step, token) == (r["sample"], r["step"], r["chosen_id"])
        assert float(q) == chosen_q(r)        # JavaScript prints floats to round-trip exactly
        assert text == ("↵\n" if r["chosen_text"] == "\n" else r["chosen_text"])
    prompts = browser.execute_script(
        "return [...document.querySelectorAll('.prompt')].map(e => e.textContent)")
    assert prompts == [RUN["prompt"]] * len(PARAMS)   # every sample, side by side
    assert browser.get_log("browser") == []           # no script error, nothing blocked


def test_clicking_a_token_shows_its_steps_table(browser, page, records):
    from selenium.webdriver.common.by import By

    load(browser, page)
    sampled = next(r for r in records if r["sample"] == 0 and r["chosen_rank"] > 1)
    greedy = next(r for r in records if r["greedy"] and r["step"] == 7)
    for r in (sampled, greedy):
        click_token(browser, r["sample"], r["step"])
        title = browser.find_element(By.ID, "d-title").text
        assert title == f"sample {r['sample']} · step {r['step']} · position {r['position']}"
        chosen = browser.find_element(By.CSS_SELECTOR, "#step-table tr.chosen")
        assert chosen.find_element(By.CSS_SELECTOR, "td").text.lstrip("→ ") == str(r["chosen_rank"])
        rows = browser.find_elements(By.CSS_SELECTOR, "#step-table tbody tr:not(.gap)")
        assert [int(row.get_attribute("data-rank")) for row in rows] == \
            [c["rank"] for c in r["candidates"]]
        why = browser.find_element(By.ID, "why")
        if r["greedy"]:
            assert why.get_attribute("data-u") == ""
            assert why.text.startswith("greedy (temperature 0): no draw;")
        else:
            assert float(why.get_attribute("data-u")) == r["u"]
            c = next(c for c in r["candidates"] if c["chosen"])
            assert why.text == (f"kept {r['n_kept']} of {r['vocab_size']} tokens; u = "
                                f"{r['u']:.3f} fell in [{c['cum_before']:.3f}, "
                                f"{c['cum_after']:.3f}) → \"{explain.visible_text(c['text'])}\" "
                                f"(rank {c['rank']})")
    # the arrow keys step through the sample
    browser.switch_to.active_element.send_keys("\ue014")   # →
    title = browser.find_element(By.ID, "d-title").text
    assert title.startswith(f"sample {greedy['sample']} · step {greedy['step'] + 1} ·")


def test_a_prompt_holding_script_stays_text(browser, records, tmp_path):
    from selenium.webdriver.common.by import By

    evil = '<script>window.injected = 1</script><img src=x onerror="window.injected = 2">'
    tampered = [dict(r) for r in records]
    tampered[0] = dict(tampered[0], chosen_text=evil + "</script>", candidates=[
        dict(c, text=evil + "</script>" if c["chosen"] else c["text"])
        for c in tampered[0]["candidates"]])
    path = tmp_path / "evil.html"
    explorer.write_html(tampered, path, dict(RUN, prompt=evil))
    load(browser, path)
    assert browser.execute_script("return window.injected === undefined")
    assert browser.find_elements(By.CSS_SELECTOR, "img") == []
    assert browser.find_element(By.CSS_SELECTOR, ".prompt").get_attribute("textContent") == evil
    first = browser.find_element(By.CSS_SELECTOR, '.tok[data-sample="0"][data-step="0"]')
    assert first.get_attribute("textContent") == evil + "</script>"
    click_token(browser, 0, 0)
    table = browser.find_element(By.ID, "step-table").get_attribute("textContent")
    assert explain.visible_text(evil + "</script>") in table   # spaces shown as ␣
    assert browser.execute_script("return window.injected === undefined")


def test_screenshot_is_not_blank_and_a_phone_needs_no_sideways_scroll(page, tmp_path):
    from PIL import Image, ImageStat

    paths, reason = chromium_paths()
    if paths is None:
        pytest.skip(reason)
    for width, height in ((1280, 860), (390, 844)):
        picture = tmp_path / f"shot-{width}.png"
        screenshot(page, picture, width, height, select=(0, 3))
        image = Image.open(picture).convert("RGB")
        assert image.size == (width, height)   # the viewport, at scale 1
        colours = image.getcolors(maxcolors=1 << 20)
        assert len(colours) > 200, "a drawn page has text, shades and charts: many colours"
        assert max(ImageStat.Stat(image).stddev) > 20, "not one flat colour"
    browser = open_browser(390, 844)
    try:
        load(browser, page)
        click_token(browser, 2, 5)
        assert browser.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth")
        assert browser.execute_script(
            "return getComputedStyle(document.getElementById('detail')).position") == "fixed"
    finally:
        browser.quit()


if __name__ == "__main__":
    # python tests/test_explorer.py PAGE.html PICTURE.png [--select=SAMPLE:STEP] [--width=W]
    #     [--height=H] [--scale=S]
    page, picture, *flags = sys.argv[1:]
    options = dict(f[2:].split("=", 1) for f in flags)
    select = tuple(int(x) for x in options["select"].split(":")) if "select" in options else None
    screenshot(page, picture, int(options.get("width", 1280)), int(options.get("height", 860)),
               select, float(options.get("scale", 1)))
    print(f"wrote {picture}")
