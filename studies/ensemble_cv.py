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


def mcnemar(a_right: np.ndarray, b_right: np.ndarray) -> dict:
    """Exact two-sided McNemar test of paired right/wrong answers: b wins where only b is right."""
    from scipy.stats import binomtest

    b_only = int((b_right & ~a_right).sum())
    a_only = int((a_right & ~b_right).sum())
    p = binomtest(b_only, b_only + a_only, 0.5).pvalue if b_only + a_only else 1.0
    return {"b_only_right": b_only, "a_only_right": a_only, "p": float(p),
            "diff_points": 100.0 * (b_right.mean() - a_right.mean())}


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
    targets, fold_of = [], []
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
        print(f"  fold {run.name}: {len(samples)} photos re-predicted", flush=True)
    return {"preds": {n: np.concatenate(v) for n, v in preds.items()}, "targets": np.concatenate(targets),
            "fold": np.concatenate(fold_of)}


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="class-folder photos (e.g. ../shared/data/minet7)")
    ap.add_argument("--work", required=True, help="folder for the cv (WORK/cv) and WORK/result.json")
    ap.add_argument("--config", default=os.path.relpath(CONFIG), help="ensemble preset (default: %(default)s)")
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--only-folds", default=None, help="e.g. 0,1,2 (the split stays --folds)")
    ap.add_argument("--skip-cv", action="store_true", help="only read a finished cv")
    ap.add_argument("--baseline", default=None, metavar="CV_DIR",
                    help="a finished single-model cv on the same folds (e.g. `mineralnet cv --config cpu-pretrained "
                         "... --folds 4 --only-folds 0`): its out-of-fold photos must be the same; adds a 'baseline' "
                         "row and the student and ensemble against it")
    args = ap.parse_args(argv)
    work = Path(args.work)
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

    def secs(name):
        return [f.get("train_seconds") for f in rows[name]["folds"]]

    table = []
    for name in ["baseline", "m0", "m1", "m2", "ensemble", "ensemble_plain", "student"]:
        if name == "ensemble_plain":  # a check: the members' plain softmax averaged, no temperature from these photos
            table.append({"model": name, "what": "plain softmax average", "top1_pooled": float(right[name].mean()),
                          "mean_class_acc_pooled": mean_class_acc(t, oof["preds"][name]),
                          "top1_folds": [float(right[name][oof["fold"] == k].mean()) for k in range(len(fold_dirs))],
                          "train_minutes_per_fold": None})
            continue
        if name not in rows:
            continue
        row = rows[name]
        member = row["folds"][0].get("member") or ({"cv": args.baseline} if name == "baseline" else {})
        s = [x for x in secs(name) if x]
        table.append({"model": name, "what": member, "top1_pooled": float(right[name].mean()),
                      "mean_class_acc_pooled": mean_class_acc(t, oof["preds"][name]),
                      "top1_folds": [f["top1"] for f in row["folds"]],
                      "top1_mean": row["top1_mean"], "top1_std": row["top1_std"],
                      "mean_class_acc_mean": row["mean_class_acc_mean"],
                      "train_minutes_per_fold": (sum(s) / len(s) / 60) if s else None})
    comparisons = {}
    from mineralnet.analysis.cvreport import paired_test

    pairs = [("m0", "student"), ("student", "ensemble"), ("m0", "ensemble"), ("ensemble", "ensemble_plain")]
    if "baseline" in rows:
        pairs = [("baseline", "student"), ("baseline", "ensemble"), ("baseline", "m0")] + pairs
    for a, b in pairs:
        comparisons[f"{b} vs {a}"] = {"photos": mcnemar(right[a], right[b])}
        if b not in rows:
            continue
        fa = {f["fold"]: f for f in rows[a]["folds"]}
        fb = {f["fold"]: f for f in rows[b]["folds"]}
        common = sorted(set(fa) & set(fb))
        comparisons[f"{b} vs {a}"].update({
            "folds_top1": paired_test([fa[i]["top1"] for i in common], [fb[i]["top1"] for i in common]),
            "folds_mean_class_acc": paired_test([fa[i]["mean_class_acc"] for i in common],
                                                [fb[i]["mean_class_acc"] for i in common])})
    student_s = secs("student")
    member_s = [sum(x) for x in zip(*[secs(f"m{i}") for i in range(3) if f"m{i}" in rows])]
    out = {"cv": str(cv), "data": args.data, "photos": int(len(t)), "folds": res["folds"],
           "folds_run": res["folds_run"], "config": args.config, "table": table, "comparisons": comparisons,
           "minutes_per_fold": {"members": float(np.mean(member_s)) / 60, "student": float(np.mean(student_s)) / 60}}
    (work / "result.json").write_text(json.dumps(out, indent=2))

    print(f"\n{len(t)} out-of-fold photos, folds {res['folds_run']} of {res['folds']}\n")
    print("| model | Top1 % (pooled) | mean class % (pooled) | Top1 per fold | train min per fold |")
    print("|---|---|---|---|---|")
    for r in table:
        m = r["train_minutes_per_fold"]
        print(f"| {r['model']} {r['what'] or ''} | {100 * r['top1_pooled']:.2f} | {100 * r['mean_class_acc_pooled']:.2f} | "
              f"{' / '.join(f'{100 * x:.1f}' for x in r['top1_folds'])} | {'-' if m is None else f'{m:.1f}'} |")
    print("\n| comparison | Δ Top1 (points) | only b right / only a right | McNemar p | folds won | fold t-test p |")
    print("|---|---|---|---|---|---|")
    for name, c in comparisons.items():
        ph, fo = c["photos"], c.get("folds_top1")
        fp = "-" if not fo or fo["p"] is None else f"{fo['p']:.3f}"
        won = f"{fo['wins']} of {fo['n']}" if fo else "-"
        print(f"| {name} | {ph['diff_points']:+.2f} | {ph['b_only_right']} / {ph['a_only_right']} | {ph['p']:.4f} | "
              f"{won} | {fp} |")
    print(f"\nwrote {work / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
