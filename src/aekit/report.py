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
import time
from pathlib import Path

import torch

import aekit
from aekit import plots
from aekit._io import refuse_existing, write_text_atomic
from aekit.models import count_parameters
from aekit.noise import add_noise, parse_noise
from aekit.runs import (CONFIG, RunExists, check_image_shape, load_model, load_split,
                        read_config, read_history, read_metrics)
from aekit.inference import encode, reconstruct, reconstruction_errors

REPORT = "report.html"
N_RECONSTRUCTIONS = 10   # test images in the reconstruction grid (the blog shows 10)
N_DENOISING = 8          # test images in the denoising figure
N_LATENTS = 2000         # test images in the latent map
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
code { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 0.85rem; }
"""


def write_report(run_dir: str | Path, data: str | None = None, noise: str | None = "gaussian:0.5",
                 overwrite: bool = False) -> Path:
    """Write ``run_dir/report.html`` for a trained run and return its path.

    ``data`` draws the figures from other data than the run's own test split (the metrics
    and config stay the run's). ``noise`` is the corruption shown in the denoising figure
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
    _, x_test, y_test = load_split(config, data)
    check_image_shape(x_test, config)
    data_name = data or config.data
    own_data = data is None or data == config.data

    sections = [_figure(
        "Reconstructions", plots.reconstruction_figure(model, x_test.first(N_RECONSTRUCTIONS)),
        f"The first {min(N_RECONSTRUCTIONS, len(x_test))} test images of {data_name} (top) and the "
        "model's reconstructions of them (bottom).")]
    sections.append(_figure(
        "Loss curves", plots.loss_curves_figure(history),
        f"Per epoch: the training loss ({config.loss}) on the training images and on the test images "
        "(val_loss), and the test images' mean squared error per pixel (val_mse)."))

    n_latents = min(N_LATENTS, len(x_test))
    latents = encode(model, x_test.first(n_latents)).flatten(1).double().numpy()  # (n, d)
    labels = None if y_test is None else y_test[:n_latents]
    size = (f"{_shape(model.latent_shape)} = {latents.shape[1]} numbers, flattened"
            if len(model.latent_shape) > 1 else f"{latents.shape[1]} numbers")
    sections.append(_figure(
        "Latent space", plots.latent_map_figure(latents, labels),
        f"The latents of the first {n_latents} test images (the encoder's output: {size} per image), "
        + ("coloured by their label." if labels is not None else "uncoloured: this data has no labels.")))

    errors = reconstruction_errors(model, x_test)  # (n,)
    threshold = metrics.get("threshold")
    sections.append(_figure(
        "Reconstruction errors", plots.error_histogram_figure(errors, threshold),
        f"Mean squared error of each of the {len(errors)} test images of {data_name}. "
        + (f"The dashed line is the run's outlier threshold from metrics.json: the error exceeded "
           f"by a fraction {metrics.get('contamination')} of the training images; images above it "
           "are flagged as outliers." if threshold is not None else "The run recorded no outlier threshold.")))

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


def _shape(shape) -> str:
    return " x ".join(str(s) for s in shape)


def _figure(title: str, fig, caption: str, caption_is_html: bool = False) -> str:
    """An ``<h2>`` and a ``<figure>`` holding ``fig`` as an embedded PNG. ``caption`` is
    escaped unless ``caption_is_html`` (then it is trusted markup built in this module)."""
    uri = "data:image/png;base64," + base64.b64encode(plots.figure_png(fig)).decode("ascii")
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
<script>{_COUNT_IMAGES}</script>
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
