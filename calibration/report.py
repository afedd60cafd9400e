"""report.html: why the thresholds are where they are, in one standalone page.

Plots are matplotlib (Agg, no display needed) PNGs embedded as base64, so the page opens from
anywhere without its folder: score histograms with the thresholds, false-reject and escape rates
against the image threshold, ROC and PR curves, the pixel-value distributions, and galleries of
the worst false rejects and the escapes with their heatmaps.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from matplotlib.figure import Figure
from scipy.stats import beta
from sklearn.metrics import precision_recall_curve, roc_curve

from calibration.scoring import model_view
from edge.bundle import Bundle, Thresholds
from thresholding.decision import largest_region
from thresholding.fit import FitResult
from thresholding.scored import Scored
from thresholding.strategies import CONFIDENCE

GOOD, DEFECT, INK, MUTED = "#2a9d8f", "#e76f51", "#264653", "#8d99ae"
GALLERY_MAX = 8
PIXEL_SAMPLE = 400_000  # pixels drawn for the pixel histogram (exact metrics use all of them)


@dataclass
class ReportData:
    title: str
    bundle: Bundle
    scored: Scored
    thresholds: Thresholds | None
    stat: np.ndarray | None  # decision statistic, device rejects <=> stat > image threshold
    rejected: np.ndarray | None  # edge's decision per image
    warnings: list[str] = field(default_factory=list)
    metrics: dict | None = None  # evaluate's summary (threshold-free metrics, per defect)
    roi: np.ndarray | None = None


# ------------------------------------------------------------------ public entry points
def fit_report(bundle: Bundle, res: FitResult) -> str:
    return render(
        ReportData(
            f"Threshold calibration: {bundle.manifest.name}",
            bundle,
            res.scored,
            res.thresholds,
            res.stat,
            res.rejected,
            list(res.warnings),
            roi=res.view.roi,
        )
    )


def evaluation_report(bundle: Bundle, ev) -> str:
    """ev: calibration.evaluate.Evaluation."""
    warnings = [ev.summary["warning"]] if "warning" in ev.summary else []
    if ev.thresholds is None:
        warnings.append(
            "this bundle has no thresholds.yaml: only threshold-free metrics are shown; "
            f"run `python -m calibration fit {bundle.root} ...` for rates and a decision"
        )
    return render(
        ReportData(
            f"Evaluation: {bundle.manifest.name}",
            bundle,
            ev.scored,
            ev.thresholds,
            ev.stat,
            ev.rejected,
            warnings,
            metrics=ev.summary,
            roi=ev.view.roi,
        )
    )


def render(d: ReportData) -> str:
    """The whole page as one HTML string (no file is touched)."""
    good = d.scored.good
    parts = [_head(d.title), _header(d), _cards(d), _warnings(d.warnings), _meaning(d)]
    parts.append(_section("Scores", _img(plot_histograms(d), "score histograms"), _hist_note(d)))
    if d.thresholds is not None:
        parts.append(
            _section(
                "False rejects and escapes against the image threshold",
                _img(plot_rates(d), "rates against threshold"),
                "Computed with the pixel threshold and minimum region area moving as calibration "
                "ties them to the image threshold, so each point is what the device would do at "
                "that setting. The shaded band is the 95% Clopper-Pearson upper bound of the "
                "false-reject rate.",
            )
        )
    if (~good).any() and good.any():
        parts.append(
            _section(
                "ROC and precision-recall (image score)",
                _img(plot_roc_pr(d), "ROC and PR curves"),
                "Threshold-free: how well the image score separates good from defective parts. "
                "The dot is the device's operating point at the current thresholds.",
            )
        )
    else:
        parts.append(
            _section(
                "ROC and precision-recall",
                "",
                "Not available: these need both good and defective images "
                "(<code>--data</code>, or <code>--defects</code> with <code>--good</code>).",
            )
        )
    parts.append(_section("Pixel values", _img(plot_pixels(d), "pixel histograms"), _pixel_note(d)))
    if (~good).any():
        parts.append(_section("Per defect type", _defect_table(d), ""))
    parts.append(_galleries(d))
    parts.append(_section("Statistics", _stats_table(d), ""))
    parts.append(_footer(d))
    return "\n".join(parts) + "\n</main></body></html>\n"


# ------------------------------------------------------------------ plots
def _fig(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    return fig


def _style(ax) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(alpha=0.25, linewidth=0.6)
    ax.tick_params(labelsize=8)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _finite(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x[np.isfinite(x)]


def plot_histograms(d: ReportData) -> bytes:
    s = d.scored.scores.astype(np.float64)
    good = d.scored.good
    fig = _fig(9.5, 3.4)
    ax = fig.add_subplot()
    lo, hi = float(s.min()), float(s.max())
    if d.thresholds is not None:
        lo, hi = min(lo, d.thresholds.image_threshold), max(hi, d.thresholds.image_threshold)
    pad = (hi - lo) * 0.05 or 0.05
    bins = np.linspace(lo - pad, hi + pad, 60)
    ax.hist(s[good], bins, color=GOOD, alpha=0.75, label=f"good ({int(good.sum())})")
    if (~good).any():
        ax.hist(s[~good], bins, color=DEFECT, alpha=0.7, label=f"defective ({int((~good).sum())})")
    if d.thresholds is not None:
        t = d.thresholds.image_threshold
        ax.axvline(t, color=INK, linewidth=1.6, label=f"image threshold {t:.4g}")
    ax.set_xlabel("image score (reject when above the image threshold)", fontsize=9)
    ax.set_ylabel("parts", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    _style(ax)
    return _png(fig)


def _rate_curves(d: ReportData) -> tuple[np.ndarray, dict]:
    m = np.asarray(d.stat, np.float64)
    good = d.scored.good
    fin = np.concatenate([_finite(m), d.scored.scores.astype(np.float64)])
    t_img = d.thresholds.image_threshold
    lo, hi = min(fin.min(), t_img), max(fin.max(), t_img)
    pad = (hi - lo) * 0.05 or 0.05
    ts = np.linspace(lo - pad, hi + pad, 400)
    mg, md = np.sort(m[good]), np.sort(m[~good])
    n = mg.size
    k = n - np.searchsorted(mg, ts, side="right")  # good parts above t
    curves = {"frr": k / n, "frr_ub": np.where(k >= n, 1.0, beta.ppf(CONFIDENCE, k + 1, n - k))}
    if md.size:
        curves["escape"] = np.searchsorted(md, ts, side="right") / md.size
    return ts, curves


def _pct_axis(digits: int):
    return lambda v, _pos: f"{100 * v:.{digits}f}%"


def plot_rates(d: ReportData) -> bytes:
    ts, c = _rate_curves(d)
    th = d.thresholds
    target = th.targets.get("target_frr") if th.targets else None
    fig = _fig(9.5, 3.7)
    axes = fig.subplots(1, 2)
    for ax, zoom in zip(axes, (False, True), strict=True):
        ax.fill_between(ts, c["frr"], c["frr_ub"], color=GOOD, alpha=0.18, linewidth=0)
        ax.plot(ts, c["frr"], color=GOOD, label="false-reject rate (good parts rejected)")
        ax.plot(ts, c["frr_ub"], color=GOOD, linestyle="--", linewidth=0.9, label="95% upper bound")
        if "escape" in c:
            ax.plot(ts, c["escape"], color=DEFECT, label="escape rate (defects passed)")
        if target is not None:
            ax.axhline(target, color=MUTED, linestyle="-.", linewidth=1, label=f"target {target:g}")
        ax.axvline(th.image_threshold, color=INK, linewidth=1.4, label="image threshold")
        ax.set_xlabel("image threshold", fontsize=9)
        ax.yaxis.set_major_formatter(_pct_axis(1 if zoom else 0))
        _style(ax)
        if zoom:
            top = max(0.1, 4 * (target or 0.0))
            ax.set_ylim(0, top)
            ax.set_title(f"zoom: 0 to {top:.0%}", fontsize=9)
        else:
            ax.set_ylim(0, 1.02)
            ax.set_ylabel("rate", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=5, fontsize=8, frameon=False)
    return _png(fig)


def plot_roc_pr(d: ReportData) -> bytes:
    y = (~d.scored.good).astype(int)
    s = d.scored.scores.astype(np.float64)
    fig = _fig(9.5, 3.6)
    ax1, ax2 = fig.subplots(1, 2)
    fpr, tpr, _ = roc_curve(y, s)
    auc = float(np.trapezoid(tpr, fpr))
    ax1.plot(fpr, tpr, color=INK, label=f"AUROC {auc:.3f}")
    ax1.plot([0, 1], [0, 1], color=MUTED, linestyle=":", linewidth=0.8)
    ax1.set_xlabel("false-reject rate (good parts rejected)", fontsize=9)
    ax1.set_ylabel("catch rate (defects rejected)", fontsize=9)
    p, r, _ = precision_recall_curve(y, s)
    ax2.plot(r, p, color=INK, label=f"best F1 {np.max(2 * p * r / np.maximum(p + r, 1e-12)):.3f}")
    ax2.set_xlabel("recall (catch rate)", fontsize=9)
    ax2.set_ylabel("precision (rejects that are defective)", fontsize=9)
    if d.rejected is not None:
        rej = d.rejected
        op_fpr = float(rej[y == 0].mean())
        op_tpr = float(rej[y == 1].mean())
        op_prec = float(y[rej].mean()) if rej.any() else 1.0
        ax1.plot(op_fpr, op_tpr, "o", color=DEFECT, label="device at current thresholds")
        ax2.plot(op_tpr, op_prec, "o", color=DEFECT, label="device at current thresholds")
    for ax in (ax1, ax2):
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8, frameon=False, loc="lower right" if ax is ax1 else "lower left")
        _style(ax)
    return _png(fig)


def _sample_pixels(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x if x.size <= PIXEL_SAMPLE else rng.choice(x, PIXEL_SAMPLE, replace=False)


def plot_pixels(d: ReportData) -> bytes:
    sc = d.scored
    rng = np.random.default_rng(0)
    inspect = np.ones(sc.maps.shape[1:], bool) if d.roi is None else d.roi
    good_px = _sample_pixels(sc.maps[sc.good][:, inspect].reshape(-1), rng)
    def_sel = ~sc.good
    normal_def = sc.maps[def_sel][:, inspect][~sc.masks[def_sel][:, inspect]]
    defect_px = sc.maps[def_sel][:, inspect][sc.masks[def_sel][:, inspect]]
    fig = _fig(9.5, 3.0)
    ax = fig.add_subplot()
    allv = np.concatenate([good_px, _sample_pixels(defect_px, rng)])
    bins = np.linspace(float(allv.min()), float(allv.max()), 80)
    kw = {"histtype": "stepfilled", "alpha": 0.55, "density": True}
    ax.hist(good_px, bins, color=GOOD, label="pixels of good parts", **kw)
    if normal_def.size and defect_px.size:
        ax.hist(defect_px, bins, color=DEFECT, label="defect pixels (from masks)", **kw)
    if d.thresholds is not None:
        ax.axvline(d.thresholds.pixel_threshold, color=INK, linestyle=":", label="pixel threshold")
        ax.axvline(d.thresholds.image_threshold, color=INK, label="image threshold")
    ax.set_yscale("log")
    ax.set_xlabel("anomaly-map value", fontsize=9)
    ax.set_ylabel("density (log)", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    _style(ax)
    return _png(fig)


def _outline(ax, mask: np.ndarray, color: str) -> None:
    for c in cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)[0]:
        c = c[:, 0]
        ax.plot(np.append(c[:, 0], c[0, 0]), np.append(c[:, 1], c[0, 1]), color=color, lw=0.9)


def plot_tile(d: ReportData, i: int, vmin: float, vmax: float) -> bytes:
    """One part: the model's view with the ground-truth mask (green), and its anomaly map with
    the regions above the pixel threshold (cyan), on a colour scale shared by all tiles."""
    sc = d.scored
    h, w = sc.maps.shape[1:]
    img = model_view(sc.samples[i], (h, w), sc.crop)
    fig = Figure(figsize=(3.3, 1.75), dpi=100, layout="constrained")
    a, b = fig.subplots(1, 2)
    a.imshow(img)
    b.imshow(sc.maps[i], cmap="inferno", vmin=vmin, vmax=vmax)
    if d.thresholds is not None:
        hot = sc.maps[i] > d.thresholds.pixel_threshold
        _outline(b, hot if d.roi is None else hot & d.roi, "cyan")
        _outline(a, hot if d.roi is None else hot & d.roi, "cyan")
    if sc.masks[i].any():
        _outline(a, sc.masks[i], "lime")
    for ax in (a, b):
        ax.set_axis_off()
    return _png(fig)


# ------------------------------------------------------------------ HTML
CSS = """
body{margin:0;background:#f4f6f8;color:#1d2a33;font:14px/1.45 system-ui,-apple-system,"Segoe UI",
Roboto,"DejaVu Sans",sans-serif}
main{max-width:1080px;margin:0 auto;padding:24px 28px 40px;background:#fff;min-height:100vh;
box-shadow:0 0 24px rgba(0,0,0,.06)}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px;padding-bottom:4px;
border-bottom:1px solid #e3e8ee}.sub{color:#5c6b77;font-size:13px}
.cards{display:grid;grid-template-columns:repeat(4,1fr);gap:12px;margin:18px 0}
.card{border:1px solid #e3e8ee;border-radius:8px;padding:10px 12px;background:#fbfcfd}
.card .k{font-size:11px;text-transform:uppercase;letter-spacing:.04em;color:#5c6b77}
.card .v{font-size:20px;font-weight:600;margin:2px 0}.card .n{font-size:12px;color:#5c6b77}
.ok{border-left:4px solid #2a9d8f}.bad{border-left:4px solid #e76f51}.neutral{border-left:4px solid
#264653}.warn{background:#fff8e1;border:1px solid #f2d27a;border-radius:6px;padding:8px 12px;
margin:8px 0}.meaning{background:#eef6f5;border-radius:6px;padding:10px 14px;margin:12px 0}
img.plot{width:100%;height:auto;display:block}.note{color:#5c6b77;font-size:12.5px;margin:4px 0}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0}td,th{padding:4px 10px;
border-bottom:1px solid #eef1f4;text-align:right}th{color:#5c6b77;font-weight:600}
td:first-child,th:first-child{text-align:left}
.gallery{display:grid;grid-template-columns:repeat(3,1fr);gap:10px}
figure{margin:0;border:1px solid #e3e8ee;border-radius:6px;padding:6px;background:#fbfcfd}
figure img{width:100%;display:block}figcaption{font-size:12px;color:#33434f;margin-top:4px}
.tag{display:inline-block;padding:0 6px;border-radius:8px;font-size:11px;color:#fff}
.tr{background:#e76f51}.tp{background:#2a9d8f}code{background:#f1f3f5;padding:0 3px;
border-radius:3px}footer{margin-top:28px;color:#8a97a3;font-size:11.5px}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def _img(png: bytes, alt: str) -> str:
    b64 = base64.b64encode(png).decode("ascii")
    return f'<img class="plot" alt="{_e(alt)}" src="data:image/png;base64,{b64}">'


def _head(title: str) -> str:
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f'<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<style>{CSS}</style></head><body><main>"
    )


def _header(d: ReportData) -> str:
    man = d.bundle.manifest
    th = d.thresholds
    bits = [
        f"model <b>{_e(man.model)}</b> / {_e(man.backbone)}",
        f"input {man.input.height}x{man.input.width}",
        f"precision {_e(th.precision if th else '')}".strip(),
        f"bundle <code>{_e(d.bundle.root)}</code>",
    ]
    if th is not None and th.created:
        bits.append(f"fitted {_e(th.created)}")
    return f"<h1>{_e(d.title)}</h1><div class='sub'>{' &middot; '.join(bits)}</div>"


def _counts(d: ReportData) -> dict:
    good = d.scored.good
    out = {"n_good": int(good.sum()), "n_def": int((~good).sum())}
    if d.rejected is not None:
        out["fr"] = int((d.rejected & good).sum())
        out["esc"] = int((~d.rejected & ~good).sum())
    return out


def _cards(d: ReportData) -> str:
    th = d.thresholds
    c = _counts(d)
    cards = []
    if th is None:
        cards.append(("Thresholds", "none", "no thresholds.yaml in the bundle", "bad"))
    else:
        cards.append(
            ("Image threshold", f"{th.image_threshold:.4g}", f"method: {th.method}", "neutral")
        )
        cards.append(
            (
                "Pixel threshold",
                f"{th.pixel_threshold:.4g}",
                f"regions of &ge; {th.min_region_area} px reject",
                "neutral",
            )
        )
        from thresholding.strategies import cp_upper

        ub = cp_upper(c["fr"], c["n_good"])
        target = th.targets.get("target_frr") if th.targets else None
        note = f"95% upper bound {_pct(ub, 2)}"
        if target is not None:
            note += f" (target {_pct(target, 2)})"
        ok = target is None or ub <= target
        cards.append(
            (
                "False rejects",
                f"{c['fr']} / {c['n_good']}",
                f"{_pct(c['fr'] / c['n_good'], 2)} of good parts; {note}",
                "ok" if ok else "bad",
            )
        )
        if c["n_def"]:
            cards.append(
                (
                    "Escapes",
                    f"{c['esc']} / {c['n_def']}",
                    f"{_pct(c['esc'] / c['n_def'])} of defective parts passed",
                    "ok" if c["esc"] == 0 else "bad",
                )
            )
        else:
            cards.append(("Escapes", "n/a", "no defective images given", "neutral"))
    if d.metrics is not None:
        for key, label in (
            ("image_auroc", "Image AUROC"),
            ("pixel_auroc", "Pixel AUROC"),
            ("pro", "AU-PRO (FPR 0.3)"),
            ("f1_max", "Best F1"),
        ):
            v = d.metrics.get(key)
            cards.append((label, "n/a" if v is None else f"{v:.3f}", "threshold-free", "neutral"))
    html_cards = "".join(
        f"<div class='card {cls}'><div class='k'>{k}</div><div class='v'>{v}</div>"
        f"<div class='n'>{n}</div></div>"
        for k, v, n, cls in cards
    )
    return f"<div class='cards'>{html_cards}</div>"


def _warnings(ws: list[str]) -> str:
    return "".join(f"<div class='warn'>&#9888; {_e(w)}</div>" for w in ws)


def _meaning(d: ReportData) -> str:
    th = d.thresholds
    if th is None:
        return ""
    c = _counts(d)
    from thresholding.strategies import cp_upper

    ub = cp_upper(c["fr"], c["n_good"])
    text = (
        f"A part is rejected when its image score is above <b>{th.image_threshold:.4g}</b>, or when "
        f"a connected region of at least <b>{th.min_region_area}</b> pixels (at model resolution) "
        f"is above <b>{th.pixel_threshold:.4g}</b> in its anomaly map. Of these "
        f"{c['n_good']} good parts it rejected {c['fr']}; so, with 95% confidence, this setting "
        f"rejects at most <b>{_pct(ub, 2)}</b> of good parts from the same process "
        "(one-sided Clopper-Pearson bound)."
    )
    if c["n_def"]:
        text += f" It caught {c['n_def'] - c['esc']} of the {c['n_def']} defective parts."
    return f"<div class='meaning'>{text}</div>"


def _section(title: str, body: str, note: str) -> str:
    n = f"<p class='note'>{note}</p>" if note else ""
    return f"<h2>{_e(title)}</h2>{body}{n}"


def _hist_note(d: ReportData) -> str:
    th = d.thresholds
    if th is None or d.stat is None:
        return "No thresholds yet."
    s = d.scored.scores.astype(np.float64)
    via_region = int(np.sum((np.asarray(d.stat) > th.image_threshold) & (s <= th.image_threshold)))
    return (
        f"{via_region} parts are rejected by the region test while their image score is at or "
        "below the image threshold."
    )


def _pixel_note(d: ReportData) -> str:
    th = d.thresholds
    region = th.stats.get("region", {}) if th is not None else {}
    bits = []
    if region.get("pixel_method"):
        bits.append(f"Pixel threshold: {_e(region['pixel_method'])}.")
    if region.get("area_method"):
        bits.append(f"Minimum region area: {_e(region['area_method'])}.")
    bits.append("Histograms of a random sample of pixels; the metrics use all of them.")
    return " ".join(bits)


def _defect_table(d: ReportData) -> str:
    sc = d.scored
    kinds = sorted({s.defect for s in sc.samples if s.defect})
    per = (d.metrics or {}).get("per_defect", {})
    head = "<tr><th>defect type</th><th>images</th><th>escapes</th><th>escape rate</th>"
    head += "<th>image AUROC</th><th>pixel AUROC</th><th>AU-PRO</th></tr>" if per else "</tr>"
    rows = []
    for k in kinds:
        sel = np.array([s.defect == k for s in sc.samples])
        esc = int((~d.rejected & sel).sum()) if d.rejected is not None else None
        row = (
            f"<tr><td>{_e(k)}</td><td>{int(sel.sum())}</td>"
            f"<td>{'n/a' if esc is None else esc}</td>"
            f"<td>{'n/a' if esc is None else _pct(esc / sel.sum())}</td>"
        )
        if per:
            p = per.get(k, {})
            row += "".join(
                f"<td>{'n/a' if p.get(m) is None else f'{p[m]:.3f}'}</td>"
                for m in ("image_auroc", "pixel_auroc", "pro")
            )
        rows.append(row + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _galleries(d: ReportData) -> str:
    sc = d.scored
    good = sc.good
    stat = d.stat if d.stat is not None else sc.scores.astype(np.float64)
    # Colour scale shared by all tiles: clean surface dark, image threshold two-thirds up.
    base = float(np.median(sc.maps[good])) if good.any() else float(sc.maps.min())
    top = d.thresholds.image_threshold if d.thresholds is not None else float(np.max(sc.scores))
    vmin, vmax = base, base + 1.5 * (top - base) if top > base else base + 1.0

    gi = np.flatnonzero(good)
    gi = gi[np.argsort(-stat[gi], kind="stable")]
    if d.rejected is not None and d.rejected[gi].any():
        title_g = "Worst false rejects (good parts rejected, highest first)"
        pick_g = gi[d.rejected[gi]][:GALLERY_MAX]
    else:
        title_g = "Good parts closest to rejection (none rejected)"
        pick_g = gi[: min(4, GALLERY_MAX)]
    out = [_gallery(d, title_g, pick_g, vmin, vmax)]
    di = np.flatnonzero(~good)
    if di.size:
        di = di[np.argsort(stat[di], kind="stable")]
        if d.rejected is not None and (~d.rejected[di]).any():
            title_d = "Escapes (defective parts passed, lowest score first)"
            pick_d = di[~d.rejected[di]][:GALLERY_MAX]
        else:
            title_d = "Defective parts closest to passing (none escaped)"
            pick_d = di[: min(4, GALLERY_MAX)]
        out.append(_gallery(d, title_d, pick_d, vmin, vmax))
    note = (
        "<p class='note'>Left: the part as the model sees it, ground-truth mask in green. Right: "
        "its anomaly map (colour scale shared by all tiles, from the clean-surface level to 1.5x "
        "the image threshold). Cyan outlines the pixels above the pixel threshold.</p>"
    )
    return "".join(out) + note


def _gallery(d: ReportData, title: str, idx: np.ndarray, vmin: float, vmax: float) -> str:
    sc = d.scored
    figs = []
    for i in idx:
        smp = sc.samples[i]
        tag = ""
        if d.rejected is not None:
            tag = (
                "<span class='tag tr'>rejected</span>"
                if d.rejected[i]
                else "<span class='tag tp'>passed</span>"
            )
        kind = "good" if smp.good else _e(smp.defect)
        cap = f"{tag} <b>{_e(Path(smp.path).name)}</b> ({kind}) &middot; score {sc.scores[i]:.4g}"
        if d.thresholds is not None:
            hot = sc.maps[i] > d.thresholds.pixel_threshold
            area = largest_region(hot if d.roi is None else hot & d.roi)
            cap += f" &middot; largest region {area} px"
        png = plot_tile(d, int(i), vmin, vmax)
        figs.append(f"<figure>{_img(png, smp.path.name)}<figcaption>{cap}</figcaption></figure>")
    body = f"<div class='gallery'>{''.join(figs)}</div>" if figs else "<p class='note'>None.</p>"
    return f"<h2>{_e(title)}</h2>{body}"


def _stats_table(d: ReportData) -> str:
    sc = d.scored
    rows = []
    for name, sel in (("good", sc.good), ("defective", ~sc.good)):
        v = sc.scores[sel].astype(np.float64)
        if v.size == 0:
            continue
        q = np.quantile(v, [0.5, 0.9, 0.99])
        rows.append(
            f"<tr><td>{name}</td><td>{v.size}</td><td>{v.mean():.4g}</td><td>{v.std():.4g}</td>"
            f"<td>{v.min():.4g}</td><td>{q[0]:.4g}</td><td>{q[1]:.4g}</td><td>{q[2]:.4g}</td>"
            f"<td>{v.max():.4g}</td></tr>"
        )
    table = (
        "<table><tr><th>image scores</th><th>n</th><th>mean</th><th>std</th><th>min</th>"
        f"<th>p50</th><th>p90</th><th>p99</th><th>max</th></tr>{''.join(rows)}</table>"
    )
    th = d.thresholds
    if th is not None and th.stats.get("fit"):
        items = "".join(
            f"<tr><td>{_e(k)}</td><td>{_e(_fmt(v))}</td></tr>" for k, v in th.stats["fit"].items()
        )
        table += f"<table><tr><th>fit ({_e(th.method)})</th><th></th></tr>{items}</table>"
    return table


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _footer(d: ReportData) -> str:
    th = d.thresholds
    src = sorted({str(Path(s.path).parent) for s in d.scored.samples})
    bits = [f"images from: {', '.join(_e(s) for s in src)}"]
    if th is not None:
        bits.append(f"graph sha256 {_e(th.model_sha256[:16])}")
    bits.append("decisions computed with edge.postprocess, the code the device runs")
    return f"<footer>{' &middot; '.join(bits)}</footer>"
