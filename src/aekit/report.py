"""One self-contained HTML page about a run: its figures, metrics and config.

``write_report(DIR)`` writes ``DIR/report.html``. Every figure is a PNG embedded as a
base64 ``data:`` URI and the styling is inline, so the file opens in any browser with no
network and can be mailed or archived on its own. The only script is an inline one that,
once the page has loaded, records on ``<body data-images-loaded="k/n">`` how many of
its n images decoded, for tests (and for anyone who opens the browser console).
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch

import aekit
from aekit import plots
from aekit._io import refuse_existing, write_text_atomic
from aekit.anomaly import recorded_threshold
from aekit.inference import encode, outlier_scores, reconstruct, reconstruction_errors
from aekit.models import RECONSTRUCTION_ERROR, count_parameters, outlier_score_name
from aekit.noise import add_noise, parse_noise
from aekit.runs import (CONFIG, RunExists, check_image_shape, is_own_data, load_split, read_config, read_history,
                        read_metrics)
from aekit.weights import load_model

REPORT = "report.html"
N_RECONSTRUCTIONS = 10   # test images in the reconstruction grid (the blog shows 10)
N_DENOISING = 8          # test images in the denoising figure
N_LATENTS = 2000         # test images in the latent map
GRID_SIDE = 15           # the decoded grid of a 2-D model: GRID_SIDE x GRID_SIDE latent points
MAP_SIZE = (480, 420)    # the latent map's canvas, in CSS pixels
MAP_VIEW_PIXELS = 120    # a hovered image is enlarged by a whole factor to about this size
NOISE_SEED = 0           # the denoising figure's corruption is the same on every report

# Counts the images that decoded once everything has loaded. Inline: it loads nothing.
_COUNT_IMAGES = """
window.addEventListener("load", function () {
  var images = document.images, loaded = 0;
  for (var i = 0; i < images.length; i++) {
    if (images[i].complete && images[i].naturalWidth > 0) loaded++;
  }
  document.body.setAttribute("data-images-loaded", loaded + "/" + images.length);
});
"""

# The latent map's hover: inlined too. One <script> with the image counter.
_MAP_SCRIPT = resources.files("aekit").joinpath("report_map.js").read_text(encoding="utf-8")

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       margin: 0; background: #f6f7f9; color: #1d232b; line-height: 1.45; }
main { max-width: 1060px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; }
h1 { font-size: 1.6rem; margin: 0 0 4px; }
h2 { font-size: 1.15rem; margin: 32px 0 8px; border-bottom: 1px solid #dde1e6; padding-bottom: 4px; }
.sub { color: #5a6472; margin: 0 0 12px; }
.headline { display: flex; gap: 28px; flex-wrap: wrap; margin: 12px 0 4px; }
.headline div { font-size: 0.85rem; color: #5a6472; }
.headline b { display: block; font-size: 1.25rem; color: #1d232b; }
figure { margin: 0 0 8px; }
figure img { max-width: 100%; height: auto; display: block; border: 1px solid #e3e6ea; }
figcaption { font-size: 0.9rem; color: #3c4450; margin-top: 6px; max-width: 900px; }
.note { background: #fff7e0; border-left: 4px solid #e0a800; padding: 6px 10px; margin: 6px 0; }
table { border-collapse: collapse; font-size: 0.9rem; }
td, th { border: 1px solid #dde1e6; padding: 3px 10px; text-align: left; vertical-align: top; }
th { background: #f0f2f5; font-weight: 600; }
td.num { font-variant-numeric: tabular-nums; text-align: right; }
.map-row { display: flex; gap: 16px; flex-wrap: wrap; align-items: flex-start; }
.map-title { font-size: 0.85rem; color: #3c4450; margin-bottom: 4px; max-width: 480px; }
#aekit-map { border: 1px solid #e3e6ea; max-width: 100%; cursor: crosshair; touch-action: none; }
.legend { font-size: 0.8rem; display: flex; flex-wrap: wrap; gap: 4px 10px; max-width: 480px; }
.legend i { display: inline-block; width: 10px; height: 10px; margin: 0 3px; border-radius: 2px; }
.views { width: 150px; font-size: 0.8rem; }
.views canvas { image-rendering: pixelated; background: #000; border: 1px solid #e3e6ea; display: block; }
.view { margin-bottom: 6px; }
.grid img { image-rendering: pixelated; width: 336px; max-width: 100%; }
.grid .map-title { max-width: 336px; }
img.sprite { display: none; }
code { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 0.85rem; }
"""


def write_report(run_dir: str | Path, data: str | None = None, noise: str | None = "gaussian:0.5",
                 overwrite: bool = False, resize: tuple[int, int] | None = None) -> Path:
    """Write ``run_dir/report.html`` for a trained run and return its path.

    ``data`` draws the figures from other data than the run's own test split (the metrics
    and config stay the run's), resized to ``resize`` (by default as the run's own images
    were). ``noise`` is the corruption shown in the denoising figure
    (``None`` or ``"none"`` leaves that figure out). An existing report is replaced only
    with ``overwrite``.
    """
    run_dir = Path(run_dir)
    read_config(run_dir)  # a clear error for a folder that is not a run, before anything else
    path = run_dir / REPORT
    refuse_existing(path, overwrite=overwrite, error=RunExists)
    corruption = parse_noise(noise)
    model, config = load_model(run_dir)
    metrics, history = read_metrics(run_dir), read_history(run_dir)
    _, x_test, y_test = load_split(config, data, other_data=True, resize=resize)
    check_image_shape(x_test, config)
    data_name = data or config.data
    own_data = data is None or is_own_data(config, data)  # named relative to here, recorded absolute

    sections = [_figure(
        "Reconstructions", plots.reconstruction_figure(model, x_test.first(N_RECONSTRUCTIONS)),
        f"The first {min(N_RECONSTRUCTIONS, len(x_test))} test images of {data_name} (top) and the "
        "model's reconstructions of them (bottom).")]
    sections.append(_figure(
        "Loss curves", plots.loss_curves_figure(history),
        f"Per epoch: the training loss ({config.loss}) on the training images and on the test images "
        "(val_loss), and the test images' mean squared error per pixel (val_mse)."))

    errors = reconstruction_errors(model, x_test)  # (n,)
    sections.append(_latent_section(model, x_test.first(min(N_LATENTS, len(x_test))),
                                    None if y_test is None else y_test[:N_LATENTS], errors))

    # The outlier score is the reconstruction error unless the family scores otherwise.
    score_name = outlier_score_name(model)
    scores = errors if score_name == RECONSTRUCTION_ERROR else outlier_scores(model, x_test)
    threshold = recorded_threshold(model, metrics.get("threshold"), metrics.get("outlier_score"))
    what = "Mean squared error" if score_name == RECONSTRUCTION_ERROR else f"Outlier score ({score_name})"
    sections.append(_figure(
        "Outlier scores", plots.error_histogram_figure(scores, threshold, f"outlier score: {score_name}"),
        f"{what} of each of the {len(scores)} test images of {data_name}. "
        + (f"The dashed line is the run's outlier threshold from metrics.json: the score exceeded "
           f"by a fraction {metrics.get('contamination')} of the training images; images above it "
           "are flagged as outliers." if threshold is not None
           else "The run recorded no outlier threshold on this score.")))

    if corruption is not None:
        clean = x_test.first(N_DENOISING)
        generator = torch.Generator().manual_seed(NOISE_SEED)
        noisy = add_noise(clean, corruption, generator)
        denoised = reconstruct(model, noisy)
        trained_on = parse_noise(config.noise)
        shown = html.escape(str(corruption))
        if trained_on is None:
            caption = (f"Test images corrupted with {shown} noise (middle) and what the model makes "
                       "of them (bottom).<div class=\"note\">This run was not trained for denoising "
                       "(its config has no noise): it only ever saw clean images, so this shows how it "
                       "copes with noise it has never seen, not what a trained denoiser does.</div>")
        else:
            caption = (f"Test images corrupted with {shown} noise (middle) and the model's "
                       f"denoised output (bottom). The run was trained for denoising with "
                       f"{html.escape(str(trained_on))} noise.")
        sections.append(_figure("Denoising", plots.denoising_figure(clean, noisy, denoised,
                                                                    f"noisy ({corruption})"),
                                caption, caption_is_html=True))

    config_json = json.loads((run_dir / CONFIG).read_text())
    page = _page(run_dir, config_json, metrics, count_parameters(model), sections, data_name, own_data)
    write_text_atomic(path, page)
    return path


def _latent_section(model, images: torch.Tensor, labels, errors) -> str:
    """The explorable latent map of ``images`` (n, C, H, W): a canvas of their codes (2-D as
    they are, wider ones projected by :func:`plots.project_2d`), coloured by ``labels`` (n,)
    when given; hovering or tapping a point shows its image and reconstruction, cut from two
    PNG sprite sheets (``report_map.js``). For a model whose latent has 2 numbers, the decoded
    grid (:func:`plots.latent_grid`) sits beside it."""
    n = len(images)
    codes = encode(model, images)                                 # (n, *latent_shape)
    points, how, (xlabel, ylabel) = plots.project_2d(codes.flatten(1))
    recon = reconstruct(model, images)                            # (n, C, H, W)
    cols = math.ceil(math.sqrt(n))
    palette, colour, legend = _colours(labels, n)
    data = {"x": [round(float(v), 5) for v in points[:, 0]], "y": [round(float(v), 5) for v in points[:, 1]],
            "palette": palette, "colour": colour, "error": [float(f"{e:.4g}") for e in errors[:n]],
            "label": None if labels is None else np.asarray(labels).tolist(),
            "cols": cols, "w": images.shape[3], "h": images.shape[2]}
    scale = max(1, MAP_VIEW_PIXELS // max(images.shape[2:]))
    view = lambda kind: (f"<div class=\"view\"><canvas id=\"aekit-view-{kind}\" width=\"{images.shape[3] * scale}\" "
                         f"height=\"{images.shape[2] * scale}\"></canvas><span>{kind}</span></div>")
    sprite = lambda kind, x: (f"<img id=\"aekit-sprite-{kind}\" class=\"sprite\" alt=\"{kind}s of the mapped test images\" "
                              f"src=\"{_png_uri(plots.png_bytes(plots.tile(x, cols)))}\">")
    latent_shape = tuple(model.latent_shape)
    size = (f"{_shape(latent_shape)} = {math.prod(latent_shape)} numbers, flattened" if len(latent_shape) > 1
            else f"{latent_shape[0]} numbers")
    grid = ""
    if math.prod(latent_shape) == 2:
        decoded = plots.latent_grid(model, codes, n=GRID_SIDE)
        grid = (f"<div class=\"grid\"><div class=\"map-title\">decoded grid: z[0] from {decoded.z0[0]:.3g} to "
                f"{decoded.z0[1]:.3g} (left to right), z[1] from {decoded.z1[0]:.3g} to {decoded.z1[1]:.3g} "
                f"(bottom to top)</div><img src=\"{_png_uri(plots.png_bytes(decoded.image))}\" "
                f"alt=\"decoded latent grid\"></div>")
    caption = (f"The latents of the first {n} test images (the encoder's output: {size} per image), "
               + ("coloured by their label." if labels is not None else "uncoloured: this data has no labels.")
               + f" Axes: {xlabel} to the right, {ylabel} upwards. Hover over a point (or tap it) to see that "
               "test image and the model's reconstruction of it, enlarged.")
    if grid:
        caption += (f" Beside it, the decoder's images of a {GRID_SIDE} x {GRID_SIDE} grid of latent points "
                    "spanning the codes from their 1st to their 99th percentile.")
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return f"""<h2>Latent space</h2>
<figure id="aekit-map-figure" data-shown="">
<div class="map-row">
<div><div class="map-title">{html.escape(how)}</div>
<canvas id="aekit-map" width="{MAP_SIZE[0]}" height="{MAP_SIZE[1]}"></canvas>
<div class="legend">{legend}</div></div>
<div class="views">{view("original")}{view("reconstruction")}<div id="aekit-map-info">Hover over or tap a point.</div></div>
{grid}
</div>
{sprite("original", images)}{sprite("reconstruction", recon)}
<script type="application/json" id="aekit-map-data">{payload}</script>
<figcaption>{html.escape(caption)}</figcaption></figure>"""


def _colours(labels, n: int) -> tuple[list[str], list[int], str]:
    """A palette of CSS colours, each of the ``n`` points' index into it, and the legend's HTML. Up to
    ``plots.MAX_LEGEND_CLASSES`` distinct labels get one colour each; more a viridis scale."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    if labels is None:
        return ["#1f77b4"], [0] * n, ""
    labels = np.asarray(labels)
    classes, index = np.unique(labels, return_inverse=True)
    if len(classes) <= plots.MAX_LEGEND_CLASSES:
        cmap = colormaps["tab10" if len(classes) <= 10 else "tab20"]
        palette = [to_hex(cmap(i)) for i in range(len(classes))]
        legend = "".join(f"<span><i style=\"background:{c}\"></i>{html.escape(str(k))}</span>"
                         for c, k in zip(palette, classes))
        return palette, index.tolist(), legend
    cmap = colormaps["viridis"]
    palette = [to_hex(cmap(i / 255)) for i in range(256)]
    rank = np.round(255 * index / (len(classes) - 1)).astype(int)
    legend = (f"<span>label {html.escape(str(classes[0]))}<i style=\"background:{palette[0]}\"></i> to "
              f"<i style=\"background:{palette[-1]}\"></i>{html.escape(str(classes[-1]))}</span>")
    return palette, rank.tolist(), legend


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _shape(shape) -> str:
    return " x ".join(str(s) for s in shape)


def _figure(title: str, fig, caption: str, caption_is_html: bool = False) -> str:
    """An ``<h2>`` and a ``<figure>`` holding ``fig`` as an embedded PNG. ``caption`` is
    escaped unless ``caption_is_html`` (then it is trusted markup built in this module)."""
    uri = _png_uri(plots.figure_png(fig))
    text = caption if caption_is_html else html.escape(caption)
    return (f"<h2>{html.escape(title)}</h2>\n<figure><img src=\"{uri}\" alt=\"{html.escape(title)}\">"
            f"<figcaption>{text}</figcaption></figure>")


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value)


def _table(mapping: dict) -> str:
    rows = []
    for key, value in mapping.items():
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        cell = "<td class=\"num\">" if numeric else "<td>"
        rows.append(f"<tr><th>{html.escape(str(key))}</th>{cell}<code>{html.escape(_format(value))}</code></td></tr>")
    return "<table>\n" + "\n".join(rows) + "\n</table>"


def _page(run_dir: Path, config: dict, metrics: dict, n_parameters: int, sections: list[str],
          data_name: str, own_data: bool) -> str:
    e = html.escape
    headline = [("test MSE", metrics.get("test_mse"), "{:.5f}"), ("test PSNR", metrics.get("test_psnr"), "{:.2f} dB"),
                ("epochs", metrics.get("epochs"), "{}"), ("parameters", n_parameters, "{:,}")]
    cards = "".join(f"<div>{e(label)}<b>{e(fmt.format(value))}</b></div>"
                    for label, value, fmt in headline if value is not None)
    figures_from = ("" if own_data else
                    f"<p class=\"note\">The figures show <code>{e(data_name)}</code>; the run was trained on "
                    f"<code>{e(str(config.get('data')))}</code>, and the metrics below are the run's own.</p>")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>aekit report: {e(run_dir.resolve().name)}</title>
<style>{_STYLE}</style>
<script>{_COUNT_IMAGES}{_MAP_SCRIPT}</script>
</head>
<body>
<main>
<h1>aekit report: {e(run_dir.resolve().name)}</h1>
<p class="sub">model <code>{e(str(config.get('model')))}</code> on <code>{e(str(config.get('data')))}</code>,
recipe <code>{e(str(config.get('recipe')))}</code>; written by aekit {e(aekit.__version__)}
on {e(time.strftime('%Y-%m-%d %H:%M'))} from <code>{e(str(run_dir))}</code></p>
<div class="headline">{cards}</div>
{figures_from}
{chr(10).join(sections)}
<h2>Metrics</h2>
<p class="sub">From <code>metrics.json</code>, measured on the run's test split at the end of training.</p>
{_table(metrics)}
<h2>Config</h2>
<p class="sub">From <code>config.json</code>: everything that defines the run.</p>
{_table(config)}
</main>
</body>
</html>
"""


__all__ = ["write_report", "REPORT"]
