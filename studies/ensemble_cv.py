"""Study: on cross-validation folds, does the distilled student beat the single model, and the ensemble both?

Runs `mineralnet cv --config CONFIG` (default studies/configs/cpu-ensemble-short.yaml: the cpu-ensemble preset
scaled to a 2-core CPU) on --data: each fold trains the members, their calibrated ensemble and the distilled
student on the fold's split. Member m0 has the single-model recipe (cpu-pretrained at the same size and epochs,
same seed and split), so every fold pairs student vs m0, ensemble vs student and ensemble vs m0 on the same photos.

    python studies/ensemble_cv.py --data ../shared/data/minet7 --work ens-cv --folds 4 [--only-folds 0,1,2]

Two paired tests per comparison: the cv table's t-test over folds (few folds, little power) and an exact
McNemar test over the out-of-fold photos (every validation photo of the folds run, each predicted by models
that never trained on it; the photos are re-predicted through the Predictor, which reproduces training's
evaluation). Also the time each part took. Writes WORK/result.json and prints Markdown tables; re-running
resumes the cv and re-reads the finished folds.

result.json keeps one record per fold (counts, per-class counts, discordant pairs, times and every photo's
prediction), so folds run apart (one full-size fold fills most of a 2-core session) pool exactly afterwards:

    python studies/ensemble_cv.py --work merged --merge fold0/result.json fold1/result.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

MINERALNET = [sys.executable, "-c", "import sys; from mineralnet.cli import main; sys.exit(main(sys.argv[1:]))"]
CONFIG = Path(__file__).resolve().parent / "configs" / "cpu-ensemble-short.yaml"


def mcnemar(b_only: int, a_only: int) -> float:
    """Exact two-sided McNemar test from the discordant counts (b right where a is wrong, and the reverse)."""
    from scipy.stats import binomtest

    return float(binomtest(b_only, b_only + a_only, 0.5).pvalue) if b_only + a_only else 1.0


def mean_class_acc(targets: np.ndarray, preds: np.ndarray) -> float:
    return float(np.mean([(preds[targets == c] == c).mean() for c in np.unique(targets)]))


def val_samples(run: Path) -> list[tuple[str, int]]:
    """The labelled validation photos of a run's split, in the split's order."""
    from mineralnet.runs import read_split

    return [(p, y) for p, y in read_split(run)["splits"]["val"] if y >= 0]


def out_of_fold(fold_dirs: list[Path]) -> dict:
    """Every model of every fold on that fold's validation photos: {name: (N,) predicted class}, targets, folds."""
    from scipy.special import softmax

    from mineralnet.ensemble.evaluate import score
    from mineralnet.infer import Predictor
    from mineralnet.runs import RunDir

    preds: dict[str, list] = {}
    targets, fold_of, photos = [], [], []
    for k, run in enumerate(fold_dirs):
        samples = val_samples(run)
        ens = score(Predictor(RunDir(run).ensemble_dir), samples)
        student = score(Predictor(run), samples)
        assert (ens["targets"] == student["targets"]).all()
        preds.setdefault("student", []).append(student["probs"].argmax(1))
        preds.setdefault("ensemble", []).append(ens["probs"].argmax(1))
        plain = []
        for i, p in enumerate(ens["member_probs"]):
            preds.setdefault(f"m{i}", []).append(p.argmax(1))
            # undo the member's temperature (fitted on these validation photos): softmax(T log p) = softmax(z)
            t = json.loads((RunDir(run).members_dir / f"m{i}" / "calibration.json").read_text())["temperature"]
            plain.append(softmax(t * np.log(np.clip(p, 1e-30, None)), axis=1))
        preds.setdefault("ensemble_plain", []).append(np.mean(plain, 0).argmax(1))
        targets.append(student["targets"])
        fold_of.append(np.full(len(samples), k))
        photos += [p for p, _ in samples]
        print(f"  fold {run.name}: {len(samples)} photos re-predicted", flush=True)
    return {"preds": {n: np.concatenate(v) for n, v in preds.items()}, "targets": np.concatenate(targets),
            "fold": np.concatenate(fold_of), "photos": photos}


def baseline_preds(fold_dirs: list[Path], row: dict, targets: np.ndarray) -> np.ndarray:
    """A separate cv's models on the same out-of-fold photos, in the order out_of_fold() put them."""
    from mineralnet.ensemble.evaluate import score
    from mineralnet.infer import Predictor

    runs = {f["fold"]: Path(f["run_dir"]) for f in row["folds"]}
    preds = []
    for run in fold_dirs:
        k = int(run.name.removeprefix("fold"))
        if k not in runs:
            raise SystemExit(f"--baseline has no fold {k}; run it with --only-folds {k}")
        samples = val_samples(run)
        if samples != val_samples(runs[k]):
            raise SystemExit(f"--baseline fold {k} validated on other photos than {run}: not the same folds")
        preds.append(score(Predictor(runs[k]), samples)["probs"].argmax(1))
    out = np.concatenate(preds)
    assert len(out) == len(targets)
    return out


MODELS = ["baseline", "m0", "m1", "m2", "ensemble", "ensemble_plain", "student"]


def pairs_for(models) -> list[tuple[str, str]]:
    """The (a, b) comparisons, "b vs a", that the models present allow."""
    pairs = [("m0", "student"), ("student", "ensemble"), ("m0", "ensemble"), ("ensemble", "ensemble_plain")]
    if "baseline" in models:
        pairs = [("baseline", "student"), ("baseline", "ensemble"), ("baseline", "m0")] + pairs
    return [(a, b) for a, b in pairs if a in models and b in models]


def fold_records(oof: dict, rows: dict, fold_dirs: list[Path], data: str, what: dict) -> list[dict]:
    """One self-contained record per fold: counts, per-class counts, paired discordances, times and the per-photo
    predictions, so folds run in different sessions (or on different machines) pool exactly with --merge."""
    t, records = oof["targets"], []
    classes = np.unique(t)
    for k, run in enumerate(fold_dirs):
        at = oof["fold"] == k
        tk = t[at]
        preds = {n: p[at] for n, p in oof["preds"].items()}
        fold = int(run.name.removeprefix("fold"))
        secs = {}
        for n, row in rows.items():
            f = [f for f in row["folds"] if f["fold"] == fold]
            secs[n] = f[0].get("train_seconds") if f else None
        records.append({
            "fold": fold, "photos": int(at.sum()),
            "right": {n: int((p == tk).sum()) for n, p in preds.items()},
            "mean_class": {n: mean_class_acc(tk, p) for n, p in preds.items()},
            "class_counts": {n: [[int((p[tk == c] == c).sum()), int((tk == c).sum())] for c in classes]
                             for n, p in preds.items()},
            "pairs": {f"{b} vs {a}": [int(((preds[b] == tk) & (preds[a] != tk)).sum()),
                                      int(((preds[a] == tk) & (preds[b] != tk)).sum())]
                      for a, b in pairs_for(preds)},
            "train_seconds": secs, "what": what,
            "predictions": {"photos": [os.path.relpath(oof["photos"][i], data) for i in np.flatnonzero(at)],
                            "targets": tk.tolist(), "preds": {n: p.tolist() for n, p in preds.items()}}})
    return records


def legacy_records(result: dict) -> list[dict]:
    """The record of a one-fold result.json written before per-fold records existed (the counts it kept are exact;
    per-class counts and per-photo predictions were not kept)."""
    if len(result["folds_run"]) != 1:
        raise SystemExit("a result.json without per-fold records can be merged only when it holds one fold")
    n = result["photos"]
    rec = {"fold": result["folds_run"][0], "photos": n, "right": {}, "mean_class": {}, "train_seconds": {},
           "what": {}, "pairs": {}}
    for r in result["table"]:
        rec["right"][r["model"]] = round(r["top1_pooled"] * n)
        rec["mean_class"][r["model"]] = r["mean_class_acc_pooled"]
        m = r["train_minutes_per_fold"]
        rec["train_seconds"][r["model"]] = None if m is None else 60 * m
        rec["what"][r["model"]] = r["what"]
    for name, c in result["comparisons"].items():
        rec["pairs"][name] = [c["photos"]["b_only_right"], c["photos"]["a_only_right"]]
    return [rec]


def summarize(records: list[dict]) -> tuple[list[dict], dict]:
    """The table and the paired comparisons of the pooled folds: McNemar over every out-of-fold photo (the folds'
    photos are disjoint, so the discordant counts add), the t-test over folds."""
    from mineralnet.analysis.cvreport import paired_test

    records = sorted(records, key=lambda r: r["fold"])
    models = [m for m in MODELS if all(m in r["right"] for r in records)]
    n = sum(r["photos"] for r in records)
    table = []
    for m in models:
        per_class = [r.get("class_counts", {}).get(m) for r in records]
        pooled_mc = None
        if all(per_class):
            right, total = np.sum(per_class, axis=0).T
            pooled_mc = float(np.mean(right / total))
        s = [r["train_seconds"].get(m) for r in records]
        s = [x for x in s if x]
        top1 = [r["right"][m] / r["photos"] for r in records]
        mc = [r["mean_class"][m] for r in records]
        table.append({"model": m, "what": records[0]["what"].get(m), "top1_pooled": sum(r["right"][m] for r in records) / n,
                      "mean_class_acc_pooled": pooled_mc, "top1_folds": top1,
                      "top1_mean": float(np.mean(top1)), "top1_std": float(np.std(top1, ddof=1)) if len(top1) > 1 else None,
                      "mean_class_acc_folds": mc, "mean_class_acc_mean": float(np.mean(mc)),
                      "train_minutes_per_fold": (sum(s) / len(s) / 60) if s else None})
    comparisons = {}
    for a, b in pairs_for(models):
        name = f"{b} vs {a}"
        b_only, a_only = np.sum([r["pairs"][name] for r in records], axis=0).tolist()
        p = mcnemar(b_only, a_only)
        diff = 100.0 * sum(r["right"][b] - r["right"][a] for r in records) / n
        comparisons[name] = {
            "photos": {"b_only_right": b_only, "a_only_right": a_only, "p": float(p), "diff_points": diff},
            "folds_top1": paired_test([r["right"][a] / r["photos"] for r in records],
                                      [r["right"][b] / r["photos"] for r in records]),
            "folds_mean_class_acc": paired_test([r["mean_class"][a] for r in records],
                                                [r["mean_class"][b] for r in records])}
    return table, comparisons


def print_tables(out: dict) -> None:
    print(f"\n{out['photos']} out-of-fold photos, folds {out['folds_run']} of {out['folds']}\n")
    print("| model | Top1 % (pooled) | mean class % (mean of folds) | Top1 per fold | train min per fold |")
    print("|---|---|---|---|---|")
    for r in out["table"]:
        m = r["train_minutes_per_fold"]
        what = r["what"] if r["what"] and r["model"] != "ensemble_plain" else ""
        print(f"| {r['model']} {what} | {100 * r['top1_pooled']:.2f} | {100 * r['mean_class_acc_mean']:.2f} | "
              f"{' / '.join(f'{100 * x:.1f}' for x in r['top1_folds'])} | {'-' if m is None else f'{m:.1f}'} |")
    print("\n| comparison | Δ Top1 (points) | only b right / only a right | McNemar p | folds won | fold t-test p |")
    print("|---|---|---|---|---|---|")
    for name, c in out["comparisons"].items():
        ph, fo = c["photos"], c["folds_top1"]
        fp = "-" if fo["p"] is None else f"{fo['p']:.3f}"
        print(f"| {name} | {ph['diff_points']:+.2f} | {ph['b_only_right']} / {ph['a_only_right']} | {ph['p']:.4f} | "
              f"{fo['wins']} of {fo['n']} | {fp} |")


def merge(paths: list[str]) -> dict:
    """Pool result.json files of the same split, study config and photos, each holding other folds."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    first = results[0]
    for p, r in zip(paths, results):
        for key in ("data", "folds", "config"):
            if r[key] != first[key]:
                raise SystemExit(f"{p}: {key} is {r[key]!r}, {paths[0]} has {first[key]!r}: not the same study")
    records, seen = [], {}
    for p, r in zip(paths, results):
        for rec in r.get("per_fold") or legacy_records(r):
            if rec["fold"] in seen:
                raise SystemExit(f"fold {rec['fold']} is in both {seen[rec['fold']]} and {p}: merge each fold once")
            seen[rec["fold"]] = p
            records.append(rec)
    return {**{k: first[k] for k in ("data", "folds", "config")}, "merged": list(paths), "records": records}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="class-folder photos (e.g. ../shared/data/minet7)")
    ap.add_argument("--work", required=True, help="folder for the cv (WORK/cv) and WORK/result.json")
    ap.add_argument("--config", default=os.path.relpath(CONFIG), help="ensemble preset (default: %(default)s)")
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--only-folds", default=None, help="e.g. 0,1,2 (the split stays --folds)")
    ap.add_argument("--skip-cv", action="store_true", help="only read a finished cv")
    ap.add_argument("--baseline", default=None, metavar="CV_DIR",
                    help="a finished single-model cv on the same folds (e.g. `mineralnet cv --config cpu-pretrained "
                         "... --folds 4 --only-folds 0`): its out-of-fold photos must be the same; adds a 'baseline' "
                         "row and the student and ensemble against it")
    ap.add_argument("--merge", nargs="+", metavar="RESULT_JSON",
                    help="pool result.json files of other folds of the same study (e.g. folds run in different "
                         "sessions) into WORK/result.json; trains and predicts nothing")
    args = ap.parse_args(argv)
    work = Path(args.work)
    if args.merge:
        m = merge(args.merge)
        records = m.pop("records")
        meta = {**m, "folds_run": sorted(r["fold"] for r in records)}
    else:
        if not args.data:
            ap.error("--data is required (unless --merge)")
        records, meta = run_study(args, work)
    table, comparisons = summarize(records)
    out = {**meta, "photos": sum(r["photos"] for r in records), "table": table, "comparisons": comparisons,
           "minutes_per_fold": {
               "members": _member_minutes(table),
               "student": next((r["train_minutes_per_fold"] for r in table if r["model"] == "student"), None)},
           "per_fold": sorted(records, key=lambda r: r["fold"])}
    work.mkdir(parents=True, exist_ok=True)
    (work / "result.json").write_text(json.dumps(out, indent=2))
    print_tables(out)
    print(f"\nwrote {work / 'result.json'}")
    return 0


def _member_minutes(table: list[dict]) -> float | None:
    m = [r["train_minutes_per_fold"] for r in table if r["model"] in ("m0", "m1", "m2")]
    return sum(m) if m and None not in m else None


def run_study(args, work: Path) -> tuple[list[dict], dict]:
    """Run (or resume) the cv, re-predict every fold's validation photos, and return the per-fold records."""
    cv = work / "cv"
    if not args.skip_cv:
        cmd = MINERALNET + ["cv", "--config", args.config, "--data", args.data, "--out", str(cv),
                            "--folds", str(args.folds)] + (["--only-folds", args.only_folds] if args.only_folds else [])
        subprocess.run(cmd, check=True)
    res = json.loads((cv / "results.json").read_text())
    rows = {r.get("part", "student"): r for r in res["variants"]}
    fold_dirs = [Path(f["run_dir"]) for f in sorted(rows["student"]["folds"], key=lambda f: f["fold"])]
    oof = out_of_fold(fold_dirs)
    t = oof["targets"]
    if args.baseline:
        base = json.loads((Path(args.baseline) / "results.json").read_text())
        rows["baseline"] = base["variants"][0]
        oof["preds"]["baseline"] = baseline_preds(fold_dirs, rows["baseline"], t)
    right = {n: p == t for n, p in oof["preds"].items()}

    # the re-predicted photos must reproduce the cv table fold by fold (the same models, the same photos)
    for name, row in rows.items():
        for k, f in enumerate(sorted(row["folds"], key=lambda f: f["fold"])):
            mine = right[name][oof["fold"] == k].mean()
            if abs(mine - f["top1"]) > 1e-9:
                print(f"warning: {name} fold {f['fold']}: Top1 {mine:.4f} re-predicted vs {f['top1']:.4f} in "
                      f"results.json", file=sys.stderr)
    what = {n: (row["folds"][0].get("member") or ({"cv": args.baseline} if n == "baseline" else {}))
            for n, row in rows.items()}
    what["ensemble_plain"] = "plain softmax average"
    meta = {"cv": str(cv), "data": args.data, "folds": res["folds"], "folds_run": res["folds_run"],
            "config": args.config}
    return fold_records(oof, rows, fold_dirs, args.data, what), meta


if __name__ == "__main__":
    sys.exit(main())
