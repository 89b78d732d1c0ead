"""`aekit report`: one self-contained HTML file, checked as HTML and rendered in Chromium."""

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from aekit._io import sha256_file
from aekit.cli import main
from aekit.report import write_report
from aekit.runs import RunError, load_model, save_weights
from aekit.training import TrainConfig
from conftest import need, one_error_line

N_FIGURES = 5  # reconstructions, loss curves, latent map, error histogram, denoising
WINDOW = (1200, 3000)


@pytest.fixture(scope="module")
def run(small_run, tmp_path_factory):
    return copy_run(small_run, tmp_path_factory.mktemp("report") / "run")


@pytest.fixture(scope="module")
def report(run):
    assert main(["report", str(run)]) == 0
    return run / "report.html"


def copy_run(run, dest):
    """A copy of a run folder without its report, for tests that change it."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("report.html"))
    return dest


class Resources(HTMLParser):
    """Every tag's attributes, and the text of <style> blocks."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.style = ""
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.style += data


def parse(path) -> Resources:
    parser = Resources()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_report_is_self_contained(report):
    page = parse(report)
    images = [attrs for tag, attrs in page.tags if tag == "img"]
    assert len(images) == N_FIGURES
    for attrs in images:
        prefix = "data:image/png;base64,"
        assert attrs["src"].startswith(prefix) and attrs["alt"]
        with Image.open(io.BytesIO(base64.b64decode(attrs["src"][len(prefix):]))) as img:
            img.verify()  # a whole, valid PNG
    # Nothing to fetch: no links, no external scripts, no URLs in attributes or styles.
    assert not [tag for tag, attrs in page.tags if tag in ("link", "iframe", "object", "embed")]
    assert not [attrs for tag, attrs in page.tags if tag == "script" and "src" in attrs]
    for tag, attrs in page.tags:
        for name, value in attrs.items():
            if name in ("src", "href", "srcset", "poster", "data"):
                assert value.startswith("data:"), (tag, name, value[:80])
    assert "url(" not in page.style and "@import" not in page.style
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", report.read_text().replace("data:image", ""))


def test_report_shows_metrics_config_and_an_honest_denoising_caption(report, run):
    text = report.read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert f"{metrics['test_mse']:.6g}" in text and f"{metrics['threshold']:.6g}" in text
    assert "<th>recipe</th>" in text and "<th>image_shape</th>" in text and "[1, 28, 28]" in text
    assert "was not trained for denoising" in text
    assert "4,385" in text  # the seed network's parameter count


def test_report_escapes_what_it_shows(run, tmp_path):
    # A copy of the run whose config holds markup, and which says it was trained for denoising.
    copy = copy_run(run, tmp_path / "copy")
    model, _ = load_model(copy, device="cpu")
    config = json.loads((copy / "config.json").read_text())
    config.update(data="<script>alert(1)</script>", noise="salt_pepper:0.1")
    (copy / "config.json").write_text(json.dumps(config))
    # The weights record the config they were trained with and are checked against it:
    # write them, and their checksum in metrics.json, as such a run would have.
    config.pop("aekit_version")
    save_weights(model, copy / "model.safetensors", TrainConfig.from_dict(config))
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics["weights_sha256"] = sha256_file(copy / "model.safetensors")
    (copy / "metrics.json").write_text(json.dumps(metrics))
    text = write_report(copy, data="mnist").read_text()
    assert "<script>alert(1)" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "trained for denoising with salt_pepper:0.1 noise" in text
    assert "not trained for denoising" not in text
    assert text.count("<script>") == 1  # the report's own image counter only


def test_report_of_unlabelled_data_without_denoising(run, tmp_path, rng):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / f"{i}.png")
    path = write_report(copy_run(run, tmp_path / "copy"), data=str(folder), noise="none")
    text = path.read_text()
    assert len([t for t, _ in parse(path).tags if t == "img"]) == N_FIGURES - 1
    assert "uncoloured: this data has no labels" in text and "The figures show" in text


def test_existing_report_is_kept_without_overwrite(run, tmp_path, capsys):
    run = copy_run(run, tmp_path / "copy")
    report = run / "report.html"
    report.write_text("old report")
    assert main(["report", str(run)]) == 2
    assert "report.html already exists; pass --overwrite to replace it" in one_error_line(capsys)
    assert report.read_text() == "old report"
    with pytest.raises(RunError, match="already exists"):
        write_report(run)
    assert main(["report", str(run), "--overwrite"]) == 0
    assert report.read_text().startswith("<!DOCTYPE html>")
    assert not list(run.glob(".*.tmp"))


@pytest.mark.parametrize("argv, message", [
    (["report", "{tmp}/nope"], "not a run folder"),
    (["report", "{run}", "--overwrite", "--data", "{tmp}/small"], "but the run was trained on (1, 28, 28)"),
])
def test_report_errors_are_one_line_and_exit_2(argv, message, run, report, tmp_path, capsys, rng):
    (tmp_path / "small").mkdir()
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / "small" / f"{i}.png")
    before = report.read_bytes()
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{run}", str(run)) for a in argv]
    assert main(argv) == 2
    assert message in one_error_line(capsys)
    assert report.read_bytes() == before


def test_bad_noise_is_refused(run):
    with pytest.raises(ValueError, match="noise must look like KIND:AMOUNT"):
        write_report(run, noise="blur:3", overwrite=True)


# ------------------------------------------------------------------------ in a browser

def chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """Debian's Chromium, headless, with no network chatter and a throwaway profile."""
    binary = shutil.which("chromium")
    need(binary is not None, "Debian's chromium is not installed; `make system-deps` installs it "
                             "(apt-get install chromium)")
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def test_report_renders_in_chromium(report, tmp_path):
    shot = tmp_path / "report.png"
    chromium(tmp_path, f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={shot}", report.as_uri())
    with Image.open(shot) as img:
        assert img.size == WINDOW
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.std() > 20  # not a blank page
    # The digits' backgrounds are pure black; the page's own colours never are, so these
    # pixels come from the embedded figures (10 reconstructions alone cover ~50,000).
    black = (pixels.max(axis=2) == 0).sum()
    assert black > 20_000, black


def test_every_image_in_the_report_loads(report, tmp_path):
    # The report's inline script writes the count on <body> at the load event; the
    # virtual-time budget lets the page finish loading before the DOM is dumped.
    dom = chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", report.as_uri()).stdout
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded is not None, dom[:500]
    assert loaded.groups() == (str(N_FIGURES), str(N_FIGURES))
