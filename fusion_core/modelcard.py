"""The model card (README.md) written next to a fused checkpoint."""

from __future__ import annotations


def model_card(record: dict) -> str:
    spec = record["spec"]
    parents = "\n".join(
        f"- `{p['path']}`{' (anchor)' if p['index'] == record['anchor'] else ''}"
        for p in record["parents"]
    )
    lines = [
        "---",
        "tags: [otfuse, model-fusion, optimal-transport]",
        "---",
        f"# Fused {record['architecture']}",
        "",
        f"Made by otfuse {record['otfuse_version']} on {record['created']} by fusing "
        f"{len(record['parents'])} {record['family']} models with "
        + ("Optimal Transport" if spec["method"] == "ot" else "vanilla averaging")
        + " (Imfeld et al., *Transformer Fusion with Optimal Transport*, ICLR 2024).",
        "",
        "## Parents",
        parents,
        "",
        "## Recipe",
        "| setting | value |",
        "|---|---|",
    ]
    keys = ("method", "alignment", "solver", "reg", "residual", "filter", "qk", "weights")
    lines += [f"| {k} | {spec[k]} |" for k in keys]
    lines += [f"| fusion time | {record['seconds']} s |", ""]
    if record.get("metrics"):
        lines += ["## One-shot metrics", "| model | metric | value |", "|---|---|---|"]
        for model, values in record["metrics"].items():
            for name, value in values.items():
                shown = f"{value:.4f}" if isinstance(value, float) else value
                lines.append(f"| {model} | {name} | {shown} |")
        lines.append("")
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    lines += [
        "## Versions",
        versions,
        "",
        "The full recipe, input file hashes and per-layer plan diagnostics are in `fusion.json`.",
        "",
    ]
    return "\n".join(lines)
