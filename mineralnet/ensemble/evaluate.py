"""`mineralnet eval` through the Predictor: for an ensemble folder and for `--tta` (any run).

`mineralnet eval RUN --split val` normally runs the model in the training loop's evaluation; an
ensemble (several models, each with its own preprocessing) and test-time augmentation (views of
the photo) need the photos themselves, so they are scored here with `Predictor.answers` and the
same report files (metrics.json, per_class.csv, confusion.png). The time per photo (decoding,
preprocessing, every model and view) is written beside the accuracy.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from mineralnet.errors import MineralNetError
from mineralnet.report import write_eval_report


def score(predictor, samples, batch_size: int = 32) -> dict:
    """Answers of `predictor` on [(path, label)] photos, batch by batch.

    Returns:
        {"targets" (N,), "probs" (N, C), "member_probs" (M, N, C) for an ensemble, "scores" {name: (N,)}
        for an ensemble, "seconds" (wall time of the answers), "ms_per_photo"}.
    """
    if batch_size < 1:
        raise MineralNetError(f"--batch-size {batch_size} must be at least 1")
    probs, members, scores = [], [], {}
    start = time.perf_counter()
    for i in range(0, len(samples), batch_size):
        ans = predictor.answers([p for p, _ in samples[i:i + batch_size]])
        probs.append(np.asarray(ans["probs"], np.float32))
        if "member_probs" in ans:
            members.append(np.asarray(ans["member_probs"], np.float32))
        for k, v in (ans.get("scores") or {}).items():
            scores.setdefault(k, []).append(np.asarray(v, np.float64))
    seconds = time.perf_counter() - start
    out = {"targets": np.array([label for _, label in samples]), "probs": np.concatenate(probs),
           "seconds": seconds, "ms_per_photo": 1000.0 * seconds / max(1, len(samples))}
    if members:
        out["member_probs"] = np.concatenate(members, axis=1)
        out["scores"] = {k: np.concatenate(v) for k, v in scores.items()}
    return out


def member_names(spec: dict) -> list[str]:
    """Short unique names of the members: their folder names, numbered when two are the same."""
    names = [Path(m["path"]).name or f"member{i}" for i, m in enumerate(spec["members"])]
    return [f"{i}-{n}" for i, n in enumerate(names)] if len(set(names)) < len(names) else names


def write_report(out_dir, predictor, samples, result: dict, extra: dict) -> dict:
    """metrics.json/per_class.csv/confusion.png for the model (and for each ensemble member under
    members/NAME/), plus summary.md: a table of Top1 and mean class accuracy per row."""
    out_dir = Path(out_dir)
    classes = predictor.classes
    t = result["targets"]
    common = {**extra, "ms_per_photo": round(result["ms_per_photo"], 3),
              "tta": list(predictor.tta) if predictor.tta else None}
    metrics = write_eval_report(out_dir, t, result["probs"].argmax(1), result["probs"], classes, extra=common)
    rows = [("ensemble" if "member_probs" in result else "model", metrics)]
    if "member_probs" in result:
        for name, p in zip(member_names(predictor.spec), result["member_probs"]):
            m = write_eval_report(out_dir / "members" / name, t, p.argmax(1), p, classes,
                                  extra={**common, "member": name, "ms_per_photo": None})
            rows.append((name, m))
    lines = ["| model | photos | Top1 % | mean class acc % |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {m['n']} | {100 * m['top1']:.2f} | {100 * m['mean_class_acc']:.2f} |" for n, m in rows]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return {"metrics": metrics, "rows": rows, "table": "\n".join(lines)}


def run_eval(args) -> int:
    """`mineralnet eval` for an ensemble folder or with --tta (see the module docstring)."""
    from mineralnet.data import scan_dataset
    from mineralnet.data.hints import check_class_root
    from mineralnet.evaluate import default_out_dir, split_samples, warn_training_overlap
    from mineralnet.metrics import format_table
    from mineralnet.predict import Predictor
    from mineralnet.threads import apply_threads, parse_threads

    split = getattr(args, "split", None)
    if not split and not args.data:
        raise MineralNetError("say what to evaluate: --data DIR (labelled photos, one sub-folder per mineral) "
                              "or --split val (the held-out photos)")
    apply_threads(parse_threads(args.threads))
    predictor = Predictor(args.run, tta=getattr(args, "tta", None))
    ensemble = predictor.kind == "ensemble"
    if split and ensemble:
        if split != "val":
            raise MineralNetError("--split train: an ensemble's members trained on different photos; use --split val "
                                  "(the photos every member held out) or --data DIR")
        from mineralnet.ensemble.build import common_val

        samples = common_val([m["resolved"] for m in predictor.spec["members"]])
    elif split:
        index = split_samples(args.run, split)
        if index.classes != predictor.classes:
            raise MineralNetError(f"the split of {str(args.run)!r} lists classes {index.classes} but its model has "
                                  f"{predictor.classes}; the run is inconsistent, evaluate with --data DIR")
        samples = list(index.samples)
    else:
        check_class_root(args.data, predictor.classes)
        index = scan_dataset(args.data, verify=True, classes=predictor.classes)
        samples = list(index.samples)
        if index.bad:
            print(f"skipped {len(index.bad)} unreadable image(s), e.g. {index.bad[0]}")
    if not samples:
        raise MineralNetError(f"no readable labelled photos to evaluate in {args.data or split!r}")
    if not ensemble and split != "train":
        warn_training_overlap(args.run, [p for p, _ in samples])
    out_dir = Path(args.out) if args.out else default_out_dir(args.run, args.data, split)
    if not args.out and getattr(args, "tta", None):  # never replace training's RUN/eval with a TTA score
        out_dir = out_dir.with_name(f"{out_dir.name}-tta-{'-'.join(predictor.tta[1:]) if predictor.tta else 'none'}")
    if (out_dir / "metrics.json").is_file():
        print(f"replacing the previous evaluation in {out_dir}")
    result = score(predictor, samples, args.batch_size)
    source = {"split": split} if split else {"data": str(args.data)}
    report = write_report(out_dir, predictor, samples, result, {"run": str(args.run), **source})
    print(format_table(report["metrics"]))
    views = len(predictor.tta) if predictor.tta else 1
    print(f"{result['ms_per_photo']:.1f} ms/photo ({views} view{'s' if views > 1 else ''}"
          f"{f', {len(predictor.members)} members' if ensemble else ''}, batch {args.batch_size}, "
          f"decoding included)")
    if ensemble:
        print(report["table"])
    print(f"wrote {out_dir / 'metrics.json'}, {out_dir / 'per_class.csv'}, {out_dir / 'confusion.png'}, "
          f"{out_dir / 'summary.md'}")
    return 0
