"""The tables of `mineralnet cv`: per-variant means and stds over folds, the paired t-test against the baseline, and
CV/results.md + results.json (crossval.py runs the folds; cvfolds.py makes and checks them).

    paired_test(a, b)                  -> two-sided paired t-test of b - a over folds, with wins and losses
    summarize_variants(variants, run)  -> adds means, stds, pooled per-class accuracy and vs_baseline to each row
    results_markdown(summary)          -> the results.md text; write_results(out, summary) writes both files
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mineralnet.analysis.cvfolds import pool_per_class
from mineralnet.files import atomic_write_json, atomic_write_text

SIGNIFICANCE = 0.05


def paired_test(a, b) -> dict:
    """Two-sided paired t-test of b - a over folds (scipy.stats.ttest_rel); also the sign count."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    d = b - a
    out = {"n": int(len(d)), "mean_diff": float(d.mean()) if len(d) else None, "p": None,
           "wins": int((d > 0).sum()), "losses": int((d < 0).sum()), "test": "paired t-test (two-sided)"}
    if len(d) >= 2:
        if np.allclose(d, d[0]):
            out["p"] = 1.0 if d[0] == 0 else 0.0
        else:
            from scipy import stats

            out["p"] = float(stats.ttest_rel(b, a).pvalue)
    out["within_noise"] = out["p"] is None or out["p"] >= SIGNIFICANCE
    return out


def _mean_std(values) -> tuple[float | None, float | None]:
    v = np.asarray([x for x in values if x is not None], float)
    if not len(v):
        return None, None
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None)


def summarize_variants(variants: list[dict], folds_run: list[int]) -> list[dict]:
    """Add means, stds and the paired comparison with the baseline (the first variant) to each variant."""
    base = variants[0]
    for v in variants:
        done = {f["fold"]: f for f in v["folds"]}
        v["folds_done"] = sorted(done)
        for key in ("top1", "mean_class_acc", "top3"):
            v[f"{key}_mean"], v[f"{key}_std"] = _mean_std(done[i].get(key) for i in sorted(done))
        if all("per_class" in f for f in v["folds"]) and v["folds"]:
            v["per_class"] = pool_per_class([f["per_class"] for f in v["folds"]], list(v["folds"][0]["per_class"]))
        if v is base:
            continue
        bdone = {f["fold"]: f for f in base["folds"]}
        common = sorted(set(done) & set(bdone))
        v["vs_baseline"] = {key: paired_test([bdone[i][key] for i in common], [done[i][key] for i in common])
                            for key in ("top1", "mean_class_acc")}
        v["vs_baseline"]["folds"] = common
    return variants


def _pct(m, s) -> str:
    if m is None:
        return "-"
    return f"{100 * m:.2f}" if s is None else f"{100 * m:.2f} ± {100 * s:.2f}"  # no std from one fold


def _delta(t: dict | None) -> str:
    if not t or t["mean_diff"] is None:
        return "-"
    p = "n/a" if t["p"] is None else f"{t['p']:.2f}"
    mark = " ≈" if t["within_noise"] else (" ▲" if t["mean_diff"] > 0 else " ▼")
    return f"{100 * t['mean_diff']:+.2f} (p={p}){mark}"


def results_markdown(summary: dict) -> str:
    variants, K = summary["variants"], summary["folds"]
    lines = [
        "# Cross-validation results", "",
        f"Data `{summary['data']}`: {summary['n']} photos, {len(summary['classes'])} classes "
        f"({', '.join(summary['classes'])}); {K}-fold stratified split (seed {summary['seed']}), "
        f"folds run: {', '.join(map(str, summary['folds_run']))}. Every variant is trained on the same folds.",
        "",
        "Top1 and mAP (the paper's mAP = mean per-class accuracy, a balanced accuracy, not detection mAP) "
        "in %, mean ± sample std over the folds, measured on each fold's validation photos with the "
        "checkpoint of the best validation Top1 (as the paper selects; this favours every variant alike). "
        f"Δ = paired difference from the baseline (first row) over the common folds, p = two-sided paired "
        f"t-test; ≈ marks a difference within fold-to-fold noise (p ≥ {SIGNIFICANCE}), ▲/▼ a significant "
        "gain/loss.", "",
        "| Variant | Top1 (%) | mAP (%) | Δ Top1 vs baseline | Δ mAP vs baseline | Folds | Top1 per fold | mAP per fold |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, v in enumerate(variants):
        done = sorted(v["folds"], key=lambda f: f["fold"])
        per = lambda k: " / ".join(f"{100 * f[k]:.1f}" for f in done) or "-"
        name = v["name"] + (" (baseline)" if i == 0 else "")
        vs = v.get("vs_baseline", {})
        lines.append(f"| {name} | {_pct(v['top1_mean'], v['top1_std'])} | "
                     f"{_pct(v['mean_class_acc_mean'], v['mean_class_acc_std'])} | "
                     f"{'-' if i == 0 else _delta(vs.get('top1'))} | {'-' if i == 0 else _delta(vs.get('mean_class_acc'))} | "
                     f"{len(done)}/{len(summary['folds_run'])} | {per('top1')} | {per('mean_class_acc')} |")
    lines += ["", "Last-epoch validation numbers (no checkpoint selection), mean over folds:", "",
              "| Variant | Top1 last epoch (%) | mAP last epoch (%) | Epochs | Train min per fold |", "|---|---|---|---|---|"]
    for v in variants:
        lt = _mean_std(f.get("last_top1") for f in v["folds"])
        lm = _mean_std(f.get("last_mean_class_acc") for f in v["folds"])
        ep = sorted({f.get("epochs") for f in v["folds"] if f.get("epochs") is not None})
        secs = [f["train_seconds"] for f in v["folds"] if f.get("train_seconds")]
        lines.append(f"| {v['name']} | {_pct(*lt)} | {_pct(*lm)} | {', '.join(map(str, ep)) or '-'} | "
                     f"{(sum(secs) / len(secs) / 60):.1f} |" if secs else
                     f"| {v['name']} | {_pct(*lt)} | {_pct(*lm)} | {', '.join(map(str, ep)) or '-'} | - |")
    lines += per_class_markdown(variants)
    lines += ["", f"Runs: `{summary['out']}/<variant>/fold<i>/` (each a full training run; "
                  f"`mineralnet explain RUN --data DATA` shows its pictures)."]
    if summary.get("command"):
        lines += ["", "Command:", "", "```", summary["command"], "```"]
    return "\n".join(lines) + "\n"


def per_class_markdown(variants: list[dict]) -> list[str]:
    """Per-class accuracy pooled over the folds in which the class was validated (correct / photos)."""
    if not all(v.get("per_class") for v in variants):
        return []
    lines = ["", "Per-class accuracy (%), pooled over the folds in which the class was validated (its correct "
                 "photos / its validation photos over those folds); a class with fewer photos than folds is "
                 "validated in fewer folds. mAP per fold is the mean over the classes present in that fold.", "",
             "| Class | Folds | Photos | " + " | ".join(v["name"] for v in variants) + " |",
             "|---|---|---|" + "---|" * len(variants)]
    for i, row in enumerate(variants[0]["per_class"]):
        accs = [v["per_class"][i]["accuracy"] for v in variants]
        lines.append(f"| {row['class']} | {row['folds']} | {row['photos']} | "
                     + " | ".join("-" if a is None else f"{100 * a:.1f}" for a in accs) + " |")
    return lines


def write_results(out: Path, summary: dict) -> None:

    atomic_write_json(out / "results.json", summary)
    atomic_write_text(out / "results.md", results_markdown(summary))
