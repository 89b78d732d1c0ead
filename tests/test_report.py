"""`aekit report`: one self-contained HTML file, checked as HTML and rendered in Chromium."""

import base64
import io
import json
import re
import shutil
import subprocess
import urllib.request
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from aekit._io import sha256_file
from aekit.cli import main
from aekit import plots
from aekit.inference import decode, encode, reconstruct
from aekit.models import build_model
from aekit.report import GRID_SIDE, N_LATENTS, write_report
from aekit.runs import RunError, load_split, read_config
from aekit.weights import load_model, save_weights
from aekit.config import TrainConfig
from conftest import copy_run, need, one_error_line

N_FIGURES = 4  # reconstructions, loss curves, error histogram, denoising
N_IMAGES = N_FIGURES + 2  # and the latent map's two sprite sheets (originals, reconstructions)
WINDOW = (1200, 3000)


@pytest.fixture(scope="module")
def run(small_run, tmp_path_factory):
    return copy_run(small_run, tmp_path_factory.mktemp("report") / "run")


@pytest.fixture(scope="module")
def report(run):
    assert main(["report", str(run)]) == 0
    return run / "report.html"


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
    assert len(images) == N_IMAGES
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
    assert len([t for t, _ in parse(path).tags if t == "img"]) == N_IMAGES - 1
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
    assert loaded.groups() == (str(N_IMAGES), str(N_IMAGES))


# ----------------------------------------------------------------- the explorable map

class DevTools:
    """Headless Chromium driven over the Chrome DevTools Protocol (a websocket): load a
    page, run JavaScript in it, move the mouse."""

    def __init__(self, tmp_path, url: str):
        need(shutil.which("chromium") is not None, "Debian's chromium is not installed; `make system-deps` "
                                                   "installs it (apt-get install chromium)")
        try:
            import websocket
        except ImportError:
            need(False, "websocket-client is not installed; pip install -e '.[dev]' installs it")
        self.process = subprocess.Popen(
            [shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", "--window-size=1200,1000", "--remote-debugging-port=0",
             f"--user-data-dir={tmp_path / 'devtools-profile'}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            # Chromium prints where it listens once it is ready: the port, then the page's socket.
            for line in self.process.stderr:
                if line.startswith("DevTools listening on ws://"):
                    port = re.search(r"ws://[^:/]+:(\d+)/", line).group(1)
                    break
            else:
                raise RuntimeError("chromium exited before it opened its DevTools port")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as response:
                pages = [t for t in json.load(response) if t["type"] == "page"]
            self.socket = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60,
                                                      suppress_origin=True)
        except BaseException:
            self.close()
            raise
        self.next_id = 0
        # Load the page and wait for its load event: every load listener, the map's too, has run.
        self.send("Page.enable")
        self.send("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        message = self.wait_for(None)
        assert "error" not in message, message
        return message["result"]

    def wait_for(self, event: str | None) -> dict:
        """The next message that is ``event``, or (None) the answer to the last command."""
        while True:
            message = json.loads(self.socket.recv())
            if (message.get("method") == event) if event else (message.get("id") == self.next_id):
                return message

    def js(self, expression: str):
        """Evaluate ``expression`` in the page (awaiting a promise) and return its JSON value."""
        result = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def mouse(self, kind: str, x: float, y: float) -> None:
        self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def close(self) -> None:
        if getattr(self, "socket", None) is not None:
            self.socket.close()
        self.process.kill()
        self.process.wait()


@pytest.fixture()
def browser(tmp_path):
    opened = []

    def open_page(path):
        opened.append(DevTools(tmp_path, path.as_uri()))
        return opened[-1]

    yield open_page
    for page in opened:
        page.close()


def canvas_pixels(page, element_id: str) -> np.ndarray:
    uri = page.js(f'document.getElementById("{element_id}").toDataURL("image/png")')
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as img:
        return np.asarray(img.convert("L"))


def sprite_cell(report_page: Resources, kind: str, i: int, cols: int, shape) -> np.ndarray:
    src = next(a["src"] for t, a in report_page.tags if t == "img" and a.get("id") == f"aekit-sprite-{kind}")
    with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as img:
        sheet = np.asarray(img.convert("L"))
    h, w = shape
    return sheet[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w]


def test_hovering_a_point_of_the_latent_map_shows_its_image(report, run, browser):
    page = browser(report)
    assert page.js('document.getElementById("aekit-map-figure").dataset.ready') == "true"
    page.js('document.getElementById("aekit-map").scrollIntoView({block: "center"})')
    n = page.js("window.aekitMap.count")
    points = np.array(page.js(f"Array.from({{length: {n}}}, (_, i) => window.aekitMap.point(i))"
                              ".map(p => [p.x, p.y])"))                                      # (n, 2)
    config = read_config(run)
    _, x_test, _ = load_split(config)
    assert n == min(N_LATENTS, len(x_test))
    cols = json.loads(re.search(r'id="aekit-map-data">(.*?)</script>', report.read_text()).group(1))["cols"]
    # Points with no other point within 2 screen pixels: the pointer on one picks that one.
    distance = np.linalg.norm(points[:, None] - points[None], axis=2) + np.eye(n) * 1e9
    alone = np.flatnonzero(distance.min(axis=1) > 2)
    chosen = [alone[0], alone[len(alone) // 2], alone[-1]]
    original_size = tuple(config.image_shape[1:])
    for step, i in enumerate(chosen):
        # Hover (a mouse move) for the first points, a press (as a tap) for the last.
        page.mouse("mouseMoved" if step < 2 else "mousePressed", *points[i])
        assert page.js('document.getElementById("aekit-map-figure").dataset.shown') == str(i)
        assert page.js('document.getElementById("aekit-map-info").textContent').startswith(f"test image {i},")
        # The enlarged views show that image: every scale-th pixel is the test image itself
        # (pixel for pixel), and the reconstruction is its cell in the reconstructions' sprite.
        original, reconstruction = (canvas_pixels(page, f"aekit-view-{kind}") for kind in ("original", "reconstruction"))
        scale = original.shape[0] // original_size[0]
        assert scale > 1 and original.shape == reconstruction.shape == (original_size[0] * scale, original_size[1] * scale)
        expected = (x_test.first(i + 1)[i, 0].numpy() * 255).round().astype(np.uint8)
        np.testing.assert_array_equal(original[scale // 2::scale, scale // 2::scale], expected)
        np.testing.assert_array_equal(reconstruction[scale // 2::scale, scale // 2::scale],
                                      sprite_cell(parse(report), "reconstruction", i, cols, original_size))
    # The sprite's reconstruction is the model's, to the rounding to 8 bits.
    model, _ = load_model(run)
    recon = (reconstruct(model, x_test.first(chosen[-1] + 1))[chosen[-1], 0].numpy() * 255).round()
    assert np.abs(sprite_cell(parse(report), "reconstruction", chosen[-1], cols, original_size) - recon).max() <= 1


def test_a_2d_model_shows_its_decoded_grid(small_2d_run, tmp_path):
    path = write_report(small_2d_run)
    grids = [a for t, a in parse(path).tags if t == "img" and a.get("alt") == "decoded latent grid"]
    assert len(grids) == 1
    with Image.open(io.BytesIO(base64.b64decode(grids[0]["src"].split(",", 1)[1]))) as img:
        assert img.size == (GRID_SIDE * 28, GRID_SIDE * 28)
    assert "2-D latent" in path.read_text() and "decoded grid: z[0] from" in path.read_text()


@pytest.fixture(scope="module")
def small_2d_run(conv_run, tmp_path_factory):
    return copy_run(conv_run, tmp_path_factory.mktemp("report-2d") / "conv2")  # the report writes into it


def test_latent_grid_decodes_corners_the_right_way_up(small_2d_run, mnist):
    model, config = load_model(small_2d_run)
    _, x_test, _ = load_split(config)
    codes = encode(model, x_test.first(200))                                  # (200, 2)
    grid = plots.latent_grid(model, codes, n=5)
    low, high = np.percentile(codes.double().numpy(), [1, 99], axis=0)
    assert grid.image.shape == (5 * 28, 5 * 28) and grid.image.dtype == np.uint8
    np.testing.assert_allclose([grid.z0, grid.z1], [[low[0], high[0]], [low[1], high[1]]])
    # Top left is (smallest z[0], largest z[1]); bottom right (largest z[0], smallest z[1]).
    corners = decode(model, torch.tensor([[low[0], high[1]], [high[0], low[1]]], dtype=torch.float32))
    expected = (corners[:, 0].numpy() * 255).round()
    assert np.abs(grid.image[:28, :28] - expected[0]).max() <= 1
    assert np.abs(grid.image[-28:, -28:] - expected[1]).max() <= 1
    with pytest.raises(ValueError, match="latent has 2 numbers"):
        plots.latent_grid(build_model("seed", (1, 28, 28)), codes)


def test_the_histogram_is_of_the_models_own_outlier_score(pca_conv_run, report, tmp_path, monkeypatch):
    """A pca-conv run's histogram shows its outlier score with the run's threshold on it; the
    seed network's, the reconstruction error."""
    from aekit.inference import outlier_scores

    assert "Mean squared error of each of the" in report.read_text()
    seen = {}
    drawn = plots.error_histogram_figure

    def spy(scores, threshold, label=plots.ERROR_LABEL):
        seen.update(scores=np.asarray(scores), threshold=threshold, label=label)
        return drawn(scores, threshold, label)

    monkeypatch.setattr(plots, "error_histogram_figure", spy)
    text = write_report(copy_run(pca_conv_run, tmp_path / "run"), noise="none").read_text()
    model, config = load_model(pca_conv_run)
    _, x_test, _ = load_split(config)
    np.testing.assert_array_equal(seen["scores"], outlier_scores(model, x_test))
    assert seen["threshold"] == json.loads((pca_conv_run / "metrics.json").read_text())["threshold"]
    assert seen["label"] == f"outlier score: {model.outlier_score_name}"
    assert f"Outlier score ({model.outlier_score_name}) of each of the {len(x_test)} test images" in text
