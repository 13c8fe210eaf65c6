"""report.html: one self-contained page (PNG plots inlined as data URIs) from metrics.json.

Plots (matplotlib, Agg canvas, no display needed): the baselines' bar chart, the metric
against the regularizer, the finetune loss curves and per-layer transport-map heatmaps.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .metrics import LANGUAGE_MODELING

MAX_HEATMAPS = 24
COLORS = {
    "parent": "#8c8c8c",
    "ensemble": "#b07aa1",
    "vanilla": "#e15759",
    "fused": "#4e79a7",
    "vanilla+finetune": "#ff9d9a",
    "fused+finetune": "#59a14f",
}


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def baseline_chart(document: dict) -> bytes | None:
    rows = [r for r in document.get("evaluation", []) if r.get("metrics")]
    if not rows:
        return None
    language_model = document["task"] in LANGUAGE_MODELING
    names = ["loss", "perplexity"] if language_model else ["accuracy", "loss"]
    fig = Figure(figsize=(4.2 * len(names), 3.4))
    for k, metric in enumerate(names):
        ax = fig.add_subplot(1, len(names), k + 1)
        shown = [r for r in rows if metric in r["metrics"]]
        values = [r["metrics"][metric] for r in shown]
        bars = ax.bar(
            range(len(shown)), values, color=[COLORS.get(r["kind"], "#4e79a7") for r in shown]
        )
        ax.set_xticks(range(len(shown)), [r["name"] for r in shown], rotation=40, ha="right")
        ax.set_title(metric + (" (higher is better)" if metric == "accuracy" else ""))
        if metric == "accuracy" and values:
            low = min(values)
            ax.set_ylim(max(0.0, low - 0.1 * (1 - low) - 0.02), 1.0)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    fig.tight_layout()
    return _png(fig)


STRUCTURE = ("anchor", "alignment", "residual", "heads")


def short_recipe(p: dict) -> str:
    """A recipe in a chart's label: "a1 act shared cross s0.01"."""
    solver = "emd" if p["solver"] == "emd" else f"s{p['reg']:g}"
    return (
        f"a{p.get('anchor', 0)} {p.get('alignment', 'weights')[:3]} "
        f"{p.get('residual', 'average')} {p.get('heads', 'matched')} {solver}"
    )


def sweep_chart(document: dict) -> bytes | None:
    """Only the solver point varied: the metric against the regularizer. Else one bar per
    recipe tried, best first, the chosen one marked."""
    sweep = document.get("sweep")
    if not sweep or not sweep.get("points"):
        return None
    structures = {tuple(p.get(k) for k in STRUCTURE) for p in sweep["points"]}
    if len(structures) > 1:
        return recipe_chart(sweep)
    metric = sweep["metric"]
    fig = Figure(figsize=(5.5, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    soft = [p for p in sweep["points"] if p["solver"] == "sinkhorn"]
    hard = [p for p in sweep["points"] if p["solver"] == "emd"]
    for split, style in (("calib", "-o"), ("eval", "--s")):
        if soft and all(p.get(split) for p in soft):
            xs = [p["reg"] for p in soft]
            ys = [p[split][metric] for p in soft]
            ax.plot(xs, ys, style, label=f"Sinkhorn, {split}")
        for p in hard:
            if p.get(split):
                ax.axhline(
                    p[split][metric],
                    linestyle=":" if split == "eval" else "-.",
                    color="#e15759",
                    label=f"EMD, {split}",
                )
    chosen = next((p for p in sweep["points"] if p.get("chosen")), None)
    if chosen and chosen["solver"] == "sinkhorn" and chosen.get("calib"):
        ax.plot(
            [chosen["reg"]],
            [chosen["calib"][metric]],
            "*",
            markersize=14,
            color="#f28e2b",
            label="chosen (calib)",
        )
    if soft:
        ax.set_xscale("log")
    ax.set_xlabel("Sinkhorn regularizer (max-normalized cost)")
    ax.set_ylabel(metric)
    ax.set_title(f"one-shot {metric} vs regularizer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def recipe_chart(sweep: dict) -> bytes:
    metric = sweep["metric"]
    better_high = metric == "accuracy"
    points = [p for p in sweep["points"] if p.get("calib")]
    points.sort(key=lambda p: p["calib"][metric], reverse=better_high)
    fig = Figure(figsize=(6.5, 1.2 + 0.22 * len(points)))
    ax = fig.add_subplot(1, 1, 1)
    ys = list(range(len(points)))[::-1]
    colors = ["#f28e2b" if p.get("chosen") else "#4e79a7" for p in points]
    ax.barh(ys, [p["calib"][metric] for p in points], color=colors, label="calib")
    evals = [(y, p["eval"][metric]) for y, p in zip(ys, points, strict=True) if p.get("eval")]
    if evals:
        ax.plot([v for _, v in evals], [y for y, _ in evals], "k|", markersize=9, label="eval")
    ax.set_yticks(ys, [short_recipe(p) for p in points], fontsize=6)
    values = [p["calib"][metric] for p in points]
    if better_high and values:
        ax.set_xlim(max(0.0, min(values) - 0.05), min(1.0, max(values) + 0.02))
    ax.set_xlabel(f"calibration {metric} (orange: chosen)")
    ax.set_title(f"recipe search: {len(sweep['points'])} recipes, best first")
    fig.tight_layout()
    return _png(fig)


def finetune_chart(document: dict) -> bytes | None:
    finetune = document.get("finetune")
    if not finetune or not finetune.get("runs"):
        return None
    fig = Figure(figsize=(5.5, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    for run in finetune["runs"]:
        if run["losses"]:
            steps, losses = zip(*run["losses"], strict=True)
            ax.plot(steps, losses, alpha=0.35, color=COLORS.get(f"{run['model']}+finetune"))
            ax.plot(
                steps,
                _smooth(losses),
                label=f"{run['model']} + finetune",
                color=COLORS.get(f"{run['model']}+finetune"),
            )
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title("finetune")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def heatmaps(maps: dict[str, torch.Tensor] | None) -> bytes | None:
    """One heatmap per solved plan of the first aligned model, scaled to mass per row."""
    if not maps:
        return None
    first = sorted({k.split("/")[0] for k in maps})[0]
    keys = [k for k in maps if k.startswith(first + "/")][:MAX_HEATMAPS]
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(3.0 * cols, 2.8 * rows))
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        plan = maps[key].float()
        plan = plan * plan.shape[0]  # rows sum to 1
        ax.imshow(plan.numpy(), cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_title(key.split("/", 1)[1], fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"transport maps of {first} (rows: its neurons, columns: the anchor's)", fontsize=9
    )
    fig.tight_layout()
    return _png(fig)


def _smooth(values, window: int = 10) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plots(document: dict, maps: dict[str, torch.Tensor] | None = None) -> dict[str, bytes]:
    made = {
        "baselines": baseline_chart(document),
        "sweep": sweep_chart(document),
        "finetune": finetune_chart(document),
        "transport_maps": heatmaps(maps),
    }
    return {name: png for name, png in made.items() if png}


def write_report(
    document: dict, path: str | Path, maps: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write report.html for a metrics.json document (and the transport maps, if any)."""
    path = Path(path)
    images = plots(document, maps)
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>otfuse report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:3px 8px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}"
        "img{max-width:100%;display:block;margin:1em 0}</style></head><body>",
        "<h1>otfuse fusion report</h1>",
        f"<p>{len(document['models'])} {e(document['task'])} models, anchor "
        f"{document['anchor']}; published: <b>{e(document['published'])}</b>; otfuse "
        f"{e(document.get('otfuse_version', ''))}.</p>",
        "<p>Parents: " + ", ".join(f"<code>{e(m)}</code>" for m in document["models"]) + "</p>",
    ]
    rows = document.get("evaluation") or []
    if rows:
        names = [
            n
            for n in ("accuracy", "loss", "perplexity")
            if any(n in (r["metrics"] or {}) for r in rows)
        ]
        parts.append(
            f"<h2>Evaluation</h2><p>On <code>{e(str(document['data']['eval']))}</code>.</p>"
        )
        parts.append(
            "<table><tr><th>model</th>" + "".join(f"<th>{n}</th>" for n in names) + "</tr>"
        )
        for r in rows:
            if r.get("skipped"):
                parts.append(
                    f"<tr><td>{e(r['name'])}</td><td colspan='{len(names)}'>skipped: "
                    f"{e(r['skipped'])}</td></tr>"
                )
                continue
            cells = "".join(f"<td>{_fmt(r['metrics'].get(n))}</td>" for n in names)
            parts.append(f"<tr><td>{e(r['name'])}</td>{cells}</tr>")
        parts.append("</table>")
    parts += _image("baselines", images, "Baselines on the eval data")
    sweep = document.get("sweep")
    if sweep:
        why = sweep.get("reason") or ""
        parts.append(
            f"<h2>Recipe search</h2><p>{len(sweep['points'])} recipes fused, chosen on "
            f"<code>{e(sweep['selected_on'])}</code> by calibration {e(sweep['metric'])}"
            f"{': ' + e(why) if why else ''}.</p><table><tr><th>#</th><th>anchor</th>"
            "<th>alignment</th><th>residual</th><th>heads</th><th>solver</th><th>reg</th>"
            "<th>calib</th><th>eval</th><th>seconds</th><th>chosen</th></tr>"
        )
        for i, p in enumerate(sweep["points"], 1):
            reg = "" if p["reg"] is None else f"{p['reg']:g}"
            calib = _fmt((p.get("calib") or {}).get(sweep["metric"]))
            evl = _fmt((p.get("eval") or {}).get(sweep["metric"]))
            structure = "".join(f"<td>{e(str(p.get(k, '')))}</td>" for k in STRUCTURE)
            parts.append(
                f"<tr><td>{i}</td>{structure}<td>{e(p['solver'])}</td><td>{reg}</td>"
                f"<td>{calib}</td><td>{evl}</td><td>{p['seconds']:.2f}</td>"
                f"<td>{'&#10003;' if p.get('chosen') else ''}</td></tr>"
            )
        parts.append("</table>")
        for skipped in sweep.get("skipped") or []:
            parts.append(f"<p>Skipped {e(str(skipped['recipe']))}: {e(skipped['reason'])}</p>")
    parts += _image("sweep", images, "Calibration metric per recipe")
    finetune = document.get("finetune")
    if finetune:
        cfg = finetune["config"]
        parts.append(
            f"<h2>Finetune</h2><p>AdamW, lr {cfg['lr']:g}, batch {cfg['batch_size']},"
            f" warmup {cfg['warmup']:g} then cosine; budget: steps {cfg['steps']}, "
            f"epochs {cfg['epochs']}, seconds {cfg['seconds']}; healing: "
            f"{_healing(cfg, finetune.get('healing'))}."
            "</p><table><tr><th>model"
            "</th><th>steps</th><th>epochs</th><th>seconds</th><th>stopped by</th>"
            "<th>before</th><th>after</th></tr>"
        )
        metric = document["primary_metric"]
        for run in finetune["runs"]:
            before = _fmt((run.get("before") or {}).get(metric))
            after = _fmt((run.get("after") or {}).get(metric))
            parts.append(
                f"<tr><td>{e(run['model'])}</td><td>{run['steps']}</td>"
                f"<td>{run['epochs']:g}</td><td>{run['seconds']:.1f}</td>"
                f"<td>{e(run['stopped_by'])}</td><td>{before}</td><td>{after}</td></tr>"
            )
        parts.append("</table>")
    parts += _image("finetune", images, "Finetune loss")
    plans = document.get("plans") or []
    if plans:
        parts.append(
            "<h2>Transport maps</h2><table><tr><th>model</th><th>space</th><th>shape"
            "</th><th>OT cost</th><th>entropy / log(nm)</th><th>distance from a "
            "permutation</th></tr>"
        )
        for d in plans:
            parts.append(
                f"<tr><td>{d['model']}</td><td>{e(d['space'])}</td>"
                f"<td>{d['shape'][0]}&times;{d['shape'][1]}</td><td>{_fmt(d['cost'])}"
                f"</td><td>{_fmt(d['entropy_ratio'])}</td>"
                f"<td>{_fmt(d['distance_from_permutation'])}</td></tr>"
            )
        parts.append("</table>")
    parts += _image("transport_maps", images, "Per-layer transport maps")
    parts.append("</body></html>\n")
    path.write_text("\n".join(parts))
    return path


def _image(name: str, images: dict[str, bytes], alt: str) -> list[str]:
    if name not in images:
        return []
    data = base64.b64encode(images[name]).decode("ascii")
    return [f"<img alt='{html.escape(alt)}' id='plot-{name}' src='data:image/png;base64,{data}'>"]


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else html.escape(str(value))


def _healing(config: dict, healing: str | None) -> str:
    distill = config.get("distill") or 0
    if not distill or healing == "plain":
        return "plain (labels)"
    return (
        f"distillation from the parents' ensemble (weight {distill:g}, "
        f"temperature {config.get('temperature', 1):g})"
    )
