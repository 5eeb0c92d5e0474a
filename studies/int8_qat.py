"""Does quantization-aware fine-tuning (`mineralnet train --qat RUN`) give a better int8 model than RUN's own?

    python studies/int8_qat.py RUN QAT_RUN [--out studies/results/int8-qat-NAME.json]

Both runs were exported first (`mineralnet-export RUN --int8 --report`; a refused int8 still leaves model.onnx and
model.int8.report.json). On the export's photo sets of RUN (`quantize.exporting.plan_photos`: calibration =
training photos, ranking = other training photos through the training augmentation, held-out = RUN's validation
photos, which QAT_RUN validates on too) this script makes the full int8 model (no fallback) of each run with RUN's
recipe and reports, on the ranking and the held-out photos:

- each run's float top-1 and its int8's, the logit SQNR and flips against its own float model, and the export's
  gate (int8 against the run's own float model, as `mineralnet-export` judges it);
- the gate of QAT_RUN's int8 against RUN's float model: what a user who had RUN gets by shipping QAT_RUN's int8
  instead (the fine-tune must not pass its own gate by making its float model worse).

The held-out columns judge; nothing here was tuned on them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="the run that was fine-tuned (exported with --int8)")
    ap.add_argument("qat_run", help="its QAT run (`mineralnet train --qat RUN`, exported with --int8)")
    ap.add_argument("--out", help="JSON of the results (default studies/results/int8-qat-<run name>.json)")
    a = ap.parse_args(argv)

    from mineralnet.errors import MineralNetError
    from mineralnet.quantize.exporting import read_int8_report

    run, qrun = Path(a.run), Path(a.qat_run)
    try:
        export, report = read_int8_report(run, None, prog="int8_qat")
        qexport, _ = read_int8_report(qrun, None, prog="int8_qat")
    except MineralNetError as e:
        sys.exit(str(e))

    from mineralnet.artifact import load_model
    from mineralnet.infer import Preprocessor
    from mineralnet.quantize import graph as g
    from mineralnet.quantize import recipe as rc
    from mineralnet.quantize.exporting import load_photo_sets, plan_photos
    from mineralnet.quantize.stats import GateSpec, evaluate_gate

    recipe = rc.Recipe(**report["recipe"].get("recipe", report["recipe"]))
    _, meta = load_model(run)
    calib, select, held = load_photo_sets(plan_photos(run, meta["classes"]), meta, Preprocessor(meta))
    models = {}
    for name, folder in (("run", export), ("qat", qexport)):
        pre = rc.preprocess(folder / "model.onnx")
        fp32, int8 = g.session(pre), g.session(rc.quantize(pre, calib.images, recipe))
        models[name] = {kind: (g.logits(s, select.images), g.logits(s, held.images))
                        for kind, s in (("fp32", fp32), ("int8", int8))}

    def top1(logits, labels):
        return round(100 * float((logits.argmax(1) == labels).mean()), 2)

    def gate(ref, cand):
        r = evaluate_gate(ref, cand, held.labels, spec=GateSpec())
        return {"drop": round(100 * r.drop, 2), "bound": round(100 * r.drop_high, 2), "passed": r.passed,
                "agreement": round(100 * r.agreement.k / len(held), 2)}

    rows = {}
    for name, m in models.items():
        (sel32, held32), (sel8, held8) = m["fp32"], m["int8"]
        rows[name] = {"fp32_top1": top1(held32, held.labels), "int8_top1": top1(held8, held.labels),
                      "ranking_sqnr_db": round(rc.logit_sqnr_db(sel32, sel8), 2),
                      "ranking_flips": int((sel8.argmax(1) != sel32.argmax(1)).sum()),
                      "heldout_sqnr_db": round(rc.logit_sqnr_db(held32, held8), 2),
                      "gate_vs_own_fp32": gate(held32, held8)}
    rows["qat"]["gate_vs_run_fp32"] = gate(models["run"]["fp32"][1], models["qat"]["int8"][1])
    rows["qat"]["fp32_vs_run_fp32_sqnr_db"] = round(rc.logit_sqnr_db(models["run"]["fp32"][1],
                                                                      models["qat"]["fp32"][1]), 2)
    for name, r in rows.items():
        print(f"{name:4s} fp32 {r['fp32_top1']:.2f}% int8 {r['int8_top1']:.2f}% | ranking {r['ranking_sqnr_db']:.2f} dB "
              f"{r['ranking_flips']} flips | held-out {r['heldout_sqnr_db']:.2f} dB | gate vs own fp32: "
              f"{json.dumps(r['gate_vs_own_fp32'])}", flush=True)
    print(f"qat int8 against the run's fp32: {json.dumps(rows['qat']['gate_vs_run_fp32'])}")
    out = Path(a.out or f"studies/results/int8-qat-{run.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": run.name, "qat_run": qrun.name, "recipe": recipe.to_dict(),
                               "photos": {"calibration": len(calib), "ranking": len(select), "held_out": len(held)},
                               "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
