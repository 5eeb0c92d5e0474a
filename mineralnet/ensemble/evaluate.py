"""Scoring through the Predictor, for an ensemble and for test-time augmentation: `mineralnet
ensemble` and `mineralnet eval ENS` / `eval RUN --tta ...` (mineralnet.analysis.evaluate.run_with_predictor).

The usual `mineralnet eval RUN` runs the model in the training loop's evaluation; an ensemble
(several models, each with its own preprocessing) and TTA (views of the photo) need the photos
themselves, so they are scored with `Predictor.answers` into the same report files (metrics.json,
per_class.csv, confusion.png), with the time per photo (decoding, preprocessing, every model and
view) beside the accuracy.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from mineralnet.errors import MineralNetError
from mineralnet.report import write_eval_report
from mineralnet.runs import MEMBERS_DIR


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
        for name, p in zip(member_names(predictor.ensemble.spec), result["member_probs"]):
            # eval/members/NAME: named as an ensemble preset's RUN/members
            m = write_eval_report(out_dir / MEMBERS_DIR / name, t, p.argmax(1), p, classes,
                                  extra={**common, "member": name, "ms_per_photo": None})
            rows.append((name, m))
    lines = ["| model | photos | Top1 % | mean class acc % |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {m['n']} | {100 * m['top1']:.2f} | {100 * m['mean_class_acc']:.2f} |" for n, m in rows]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return {"metrics": metrics, "rows": rows, "table": "\n".join(lines)}
