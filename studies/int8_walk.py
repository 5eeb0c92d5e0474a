"""Which stopping rule should the int8 fallback walk use? Replays the walk of one export and judges every
step on the held-out photos too.

    python studies/int8_walk.py RUN [--export DIR] [--steps 24] [--out studies/results/int8-walk-NAME.json]

The export (`mineralnet-export RUN --int8 --report`) wrote model.onnx and model.int8.report.json: the chosen
recipe and the sensitivity ranking made on the ranking photos. This script rebuilds the same full int8 model
(same recipe, same calibration photos: `quantize.exporting.plan_photos`), floats the first k nodes of the
ranking for k = 0..--steps, and records at each k what the ranking photos say (flips, logit SQNR, the gate)
and what the held-out photos say (drop, its bound, the verdict), with the share of MACs left in int8. Then it
applies each candidate stopping rule to the ranking-photo columns alone and prints the held-out verdict of
the k it picks. The held-out columns judge the rules; no rule reads them.

Rules (all keep the leading nodes whose own gain is >= 0.5 dB, and stop at the 80% MAC floor):
- gate: stop at the first k where the gate holds on the ranking photos (the rule up to 2026-12-07);
- step-X: stop when floating the next node adds less than X dB of measured logit SQNR on the ranking photos;
- sqnr-T: stop at the first k whose logit SQNR on the ranking photos reaches T dB.
"""
from __future__ import annotations

import argparse
import json
import sys
from itertools import takewhile
from pathlib import Path

from mineralnet.quantize.fallback import MIN_INT8_SHARE as FLOOR, leading_above

STEP_DB = (0.25, 0.5, 1.0)
TARGET_DB = (20.0, 22.0, 24.0)


def pick(rows: list[dict], rule: str, wanted: int) -> int:
    """The k that `rule` stops at, reading only the ranking-photo columns of `rows` (row k = k nodes float)."""
    allowed = rows[:1] + list(takewhile(lambda r: r["int8_mac_share"] >= FLOOR, rows[1:]))  # as the walk stops
    last = allowed[-1]["k"]
    start = min(wanted, last)
    if rule == "gate":
        return next((r["k"] for r in allowed if r["k"] >= start and r["ranking_passed"]), last)
    kind, value = rule.split("-")
    value = float(value)
    if kind == "step":
        for r in allowed:
            nxt = rows[r["k"] + 1] if r["k"] < last else None
            if r["k"] >= start and (nxt is None or nxt["ranking_sqnr_db"] - r["ranking_sqnr_db"] < value):
                return r["k"]
        return last
    return next((r["k"] for r in allowed if r["k"] >= start and r["ranking_sqnr_db"] >= value), last)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run folder that was exported with --int8 --report")
    ap.add_argument("--export", help="its export folder (default RUN/export)")
    ap.add_argument("--steps", type=int, default=24, help="walk this many nodes of the ranking (default 24)")
    ap.add_argument("--out", help="JSON of the walk (default studies/results/int8-walk-<run name>.json)")
    a = ap.parse_args(argv)

    from mineralnet.artifact import load_model
    from mineralnet.errors import MineralNetError
    from mineralnet.infer import Preprocessor
    from mineralnet.quantize import graph as g
    from mineralnet.quantize import recipe as rc
    from mineralnet.quantize.exporting import load_photo_sets, plan_photos, read_int8_report
    from mineralnet.quantize.stats import GateSpec, evaluate_gate

    run = Path(a.run)
    try:
        export, report = read_int8_report(run, a.export, prog="int8_walk")
    except MineralNetError as e:
        sys.exit(str(e))
    if "sensitivity" not in report:
        sys.exit(f"{export}/model.int8.report.json has no sensitivity ranking: export with --int8 --report")
    _, meta = load_model(run)
    calib, select, held = load_photo_sets(plan_photos(run, meta["classes"]), meta, Preprocessor(meta))
    recipe = rc.Recipe(**report["recipe"].get("recipe", report["recipe"]))
    pre = rc.preprocess(export / "model.onnx")
    qdq = g.load(rc.quantize(pre, calib.images, recipe))
    rows_rank = report["sensitivity"]["ranking"]
    order = [r["node"] for r in rows_rank]
    wanted = leading_above([r["sqnr_gain_db"] for r in rows_rank])
    spec = GateSpec()
    sess = g.session(pre)
    ref_sel, ref_held = g.logits(sess, select.images), g.logits(sess, held.images)
    macs = g.macs(g.load(pre))
    rows = []
    for k in range(min(a.steps, len(order)) + 1):
        model = g.float_nodes(qdq, pre, order[:k]) if k else qdq
        s = g.session(model)
        sel, hold = g.logits(s, select.images), g.logits(s, held.images)
        rg = evaluate_gate(ref_sel, sel, select.labels, spec=spec)
        hg = evaluate_gate(ref_held, hold, held.labels, spec=spec)
        rows.append({"k": k, "node": order[k - 1] if k else None,
                     "int8_mac_share": round(g.int8_mac_share(model, macs), 4),
                     "ranking_flips": int(len(sel) - rg.agreement.k),
                     "ranking_sqnr_db": round(rc.logit_sqnr_db(ref_sel, sel), 2),
                     "ranking_passed": rg.passed, "ranking_bound": round(100 * rg.drop_high, 2),
                     "heldout_flips": int(len(hold) - hg.agreement.k),
                     "heldout_sqnr_db": round(rc.logit_sqnr_db(ref_held, hold), 2),
                     "heldout_drop": round(100 * hg.drop, 2), "heldout_bound": round(100 * hg.drop_high, 2),
                     "heldout_passed": hg.passed})
        r = rows[-1]
        print(f"k={k:2d} int8 {r['int8_mac_share']:.1%}  ranking: {r['ranking_flips']} flips "
              f"{r['ranking_sqnr_db']:5.2f} dB "
              f"{'pass' if r['ranking_passed'] else 'fail'}  held-out: {r['heldout_flips']} flips "
              f"{r['heldout_sqnr_db']:5.2f} dB drop {r['heldout_drop']:+.2f} bound {r['heldout_bound']:.2f} "
              f"{'PASS' if r['heldout_passed'] else 'FAIL'}", flush=True)
    rules = ["gate", *[f"step-{x:g}" for x in STEP_DB], *[f"sqnr-{t:g}" for t in TARGET_DB]]
    picks = {}
    for rule in rules:
        k = pick(rows, rule, wanted)
        cols = ("int8_mac_share", "heldout_drop", "heldout_bound", "heldout_passed")
        picks[rule] = {"k": k, **{c: rows[k][c] for c in cols}}
        print(f"{rule:9s} -> k={k:2d} int8 {rows[k]['int8_mac_share']:.1%} "
              f"held-out drop {rows[k]['heldout_drop']:+.2f} "
              f"bound {rows[k]['heldout_bound']:.2f} {'PASS' if rows[k]['heldout_passed'] else 'FAIL'}")
    out = Path(a.out or f"studies/results/int8-walk-{run.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": run.name, "recipe": recipe.to_dict(), "wanted": wanted, "floor": FLOOR,
                               "photos": {"calibration": len(calib), "ranking": len(select), "held_out": len(held)},
                               "rows": rows, "picks": picks}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
