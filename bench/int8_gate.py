"""int8 a deployment engineer can trust (issue 28): full int8 vs the recipe chosen by measurement vs the
automatic float fallback, judged by the int8 gate on the run's held-out photos, with latency in ONNX Runtime
and OpenVINO against fp32; and the broken-quantization check (ranges from 4 all-black photos).

    python bench/int8_gate.py RUN --work DIR [--threads 2]

RUN needs its split.json (the run's training photos calibrate and select, its validation photos judge).
Writes DIR/int8_gate.json, DIR/int8_gate.md and the chosen model's report DIR/model.int8.report.{json,md,png}.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _cpu() -> dict:
    from mineralnet.quantize.recipe import VNNI_FLAGS, cpu_flags

    model = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                  if l.startswith("model name")), platform.processor())
    flags = cpu_flags()
    keep = ("avx2", "fma", "avx512f", "avx512_bf16", *VNNI_FLAGS, "amx_bf16")
    return {"model": model, "cores": len([l for l in Path("/proc/cpuinfo").read_text().splitlines()
                                          if l.startswith("processor")]),
            "flags": [f for f in keep if f in flags]}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"


def _openvino_ms(path, image, threads: int, seconds: float = 2.0) -> float | None:
    try:
        import openvino as ov
    except ImportError:
        return None
    core = ov.Core()
    compiled = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})
    req = compiled.create_infer_request()
    x = np.ascontiguousarray(image[None], dtype=np.float32)
    for _ in range(3):
        req.infer({0: x})
    times, t_start = [], time.perf_counter()
    while len(times) < 10 or time.perf_counter() - t_start < seconds:
        t0 = time.perf_counter()
        req.infer({0: x})
        times.append(1000 * (time.perf_counter() - t0))
    return float(np.median(times))


def _verdict(entry: dict) -> str:
    if entry["variant"].startswith(("fp16", "bf16")):
        return "(not gated) " + ("would pass" if entry["passed"] else "would fail")
    return "pass" if entry["passed"] else "FAIL"


def _ms(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def render(table: list) -> str:
    """The markdown table of int8_gate.json's rows."""
    md = ["| variant | accuracy fp32 -> variant | drop (95% upper) | agreement [95% CI] | confident-photo agreement | "
          "gate | int8 MACs | ORT ms | OpenVINO ms |", "|---|---|---|---|---|---|---|---|---|"]
    for e in table:
        if e["variant"] == "fp32":
            md.append(f"| fp32 | - | - | - | - | - | 0% | {e['ort_ms']:.2f} | {e['openvino_ms'] or '-'} |")
            continue
        a, c = e["agreement"], e["confident_agreement"]
        md.append(f"| {e['variant']} | {e['accuracy_fp32']['k'] / e['accuracy_fp32']['n']:.2%} -> "
                  f"{e['accuracy_int8']['k'] / e['accuracy_int8']['n']:.2%} | {100 * e['drop']:+.2f} "
                  f"({100 * e['drop_high']:.2f}) | {a['k'] / a['n']:.1%} [{a['low']:.1%}, {a['high']:.1%}] | "
                  f"{c['k']}/{c['n']} | {_verdict(e)} | {e['int8_mac_share']:.0%} | {_ms(e['ort_ms'])} | "
                  f"{_ms(e['openvino_ms'])} |")
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--work", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=1.5, help="timing per model per round (3 rounds)")
    ap.add_argument("--methods", default=",".join(("minmax", "percentile", "entropy")),
                    help="calibration methods the recipe search tries")
    ap.add_argument("--keep", default="tail,maps", help="float regions the recipe search tries")
    ap.add_argument("--no-baselines", action="store_true", help="skip the two full-int8 MinMax rows")
    ap.add_argument("--commit", default=None, help="the commit measured (default: git rev-parse HEAD here)")
    ap.add_argument("--gate", default=None, help="--int8-gate text (default drop=1,bound=2)")
    ap.add_argument("--render", action="store_true", help="only re-render WORK/int8_gate.md from WORK/int8_gate.json")
    args = ap.parse_args(argv)
    if args.render:
        md = render(json.loads((Path(args.work) / "int8_gate.json").read_text())["table"])
        (Path(args.work) / "int8_gate.md").write_text(md)
        print(md)
        return 0

    from mineralnet.export.formats import ExportContext, ExportOptions, export
    from mineralnet.quantize import exporting, graph as g, pipeline, recipe as rc, report as rp
    from mineralnet.quantize.stats import parse_gate

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    lines = []

    def log(line):
        print(line, flush=True)
        lines.append(line)

    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    export(args.run, ["fp16"], ExportOptions(out_dir=work / "export"), log=log)
    fp32 = work / "export" / "model.onnx"
    fp16 = work / "export" / "model.fp16.onnx"
    ctx = ExportContext(args.run, ExportOptions(out_dir=work / "export"))
    spec = parse_gate(args.gate)
    plan = exporting.plan_photos(args.run, ctx.meta["classes"])
    calib = exporting.load_photos(plan.calib, ctx.preprocess, source=plan.calib_source)
    old_calib = pipeline.Photos(calib.images[::max(1, len(calib) // 128)][:128], None, None, "128 training photos")
    select = exporting.load_photos([p for p, _ in plan.select], exporting.augmented_preprocess(ctx.meta),
                                   [y for _, y in plan.select], "selection photos (augmented)")
    held = exporting.load_photos([p for p, _ in plan.heldout], ctx.preprocess, [y for _, y in plan.heldout],
                                 plan.heldout_source)
    noise = {"bf16": exporting.bf16_logits(ctx.model, held.images)}
    base = rc.default_recipe()
    from mineralnet.quantize.stats import evaluate_gate

    # the float low precisions, judged by the same statistics on the same photos (their "drop" is not gated)
    ref_held = g.logits(g.session(fp32.read_bytes()), held.images)
    floats = {"fp16 ONNX": evaluate_gate(ref_held, g.logits(g.session(fp16.read_bytes()), held.images), held.labels,
                                         spec=spec, source=f"{len(held)} {held.source}"),
              "bf16 (PyTorch autocast)": evaluate_gate(ref_held, noise["bf16"], held.labels, spec=spec,
                                                       source=f"{len(held)} {held.source}")}
    classes = list(ctx.meta["classes"])
    rows = {}
    trials = rc.candidates(base, args.methods.split(","), args.keep.split(","))
    t = time.perf_counter()
    r = None if args.no_baselines else pipeline.make_int8(fp32, old_calib, select, held, spec=spec, recipe=base,
                                                          search=False, want_report=False,
                           noise=noise, classes=classes)
    if r is not None:
        rows["full int8, MinMax on 128 photos (the old default)"] = (r.model, r.gate, r.recipe, time.perf_counter() - t)
        log(f"old default: {r.gate.line()}")
        t = time.perf_counter()
        r = pipeline.make_int8(fp32, calib, select, held, spec=spec, recipe=base, search=False, want_report=False,
                               noise=noise, classes=classes)
        rows[f"full int8, MinMax on {len(calib)} photos"] = (r.model, r.gate, r.recipe, time.perf_counter() - t)
        log(f"minmax {len(calib)}: {r.gate.line()}")
    t = time.perf_counter()
    auto = pipeline.make_int8(fp32, calib, select, held, spec=spec, recipe=base, search=True, fallback="auto",
                              want_report=True, noise=noise, classes=classes, trials=trials, log=log)
    chosen_full = auto.full_int8 or auto.model
    from mineralnet.quantize.stats import GateResult  # noqa: F401  (rows hold GateResult objects)

    full_gate = auto.report["full_int8_gate"]
    rows[f"full int8, chosen recipe ({auto.recipe.label()})"] = (chosen_full, full_gate, auto.recipe, None)
    if auto.full_int8 is not None:
        rows[f"chosen recipe + fallback ({len(auto.report['fallback']['floated'])} node(s) in float)"] = (
            auto.model, auto.gate, auto.recipe, time.perf_counter() - t)
    paths = rp.write(auto.report, work)
    t = time.perf_counter()
    black = np.zeros((4, *calib.images.shape[1:]), np.float32)
    mean, std = np.asarray(ctx.meta["mean"], np.float32), np.asarray(ctx.meta["std"], np.float32)
    black += (-mean / std)[None, :, None, None]
    broken = pipeline.make_int8(fp32, pipeline.Photos(black, source="4 all-black photos"), select, held, spec=spec,
                                recipe=base, search=False, want_report=False, classes=classes)
    log(f"broken calibration (4 all-black photos): {broken.gate.line()}")

    # latency, interleaved, batch 1
    pre = rc.preprocess(fp32)
    models = {"fp32": fp32.read_bytes(), "fp16 ONNX": fp16.read_bytes(), **{k: v[0] for k, v in rows.items()}}
    files = {}
    for i, (k, data) in enumerate(models.items()):
        files[k] = work / f"variant{i}.onnx"
        files[k].write_bytes(data)
    sessions = {k: g.session(v, threads=args.threads) for k, v in files.items()}
    ort_ms = {k: float("inf") for k in files}
    ov_ms = {k: float("inf") for k in files}
    for _ in range(3):
        for k in files:
            ort_ms[k] = min(ort_ms[k], g.latency_ms(sessions[k], held.images[0], seconds=args.seconds))
            ms = _openvino_ms(files[k], held.images[0], args.threads, seconds=args.seconds)
            ov_ms[k] = min(ov_ms[k], ms) if ms is not None else None
    macs = g.macs(g.load(pre))
    table = []
    for k in files:
        entry = {"variant": k, "ort_ms": round(ort_ms[k], 2),
                 "openvino_ms": None if ov_ms[k] is None else round(ov_ms[k], 2)}
        if k == "fp16 ONNX":
            gd = floats[k].to_dict()
            entry.update(gate=gd["line"], passed=gd["passed"], drop=gd["drop"], drop_high=gd["drop_high"],
                         agreement=gd["agreement"], accuracy_fp32=gd["accuracy_fp32"], accuracy_int8=gd["accuracy_int8"],
                         confident_agreement=gd["confident_agreement"], noise_floor=None, int8_mac_share=0.0)
        elif k != "fp32":
            model, gate, recipe, secs = rows[k]
            gd = gate if isinstance(gate, dict) else gate.to_dict()
            entry.update(gate=gd["line"], passed=gd["passed"], drop=gd["drop"], drop_high=gd["drop_high"],
                         agreement=gd["agreement"], accuracy_fp32=gd["accuracy_fp32"], accuracy_int8=gd["accuracy_int8"],
                         confident_agreement=gd["confident_agreement"], noise_floor=gd["noise_floor"],
                         int8_mac_share=g.int8_mac_share(g.load(model), macs), seconds=secs)
        table.append(entry)
    for k, gate in floats.items():
        if k not in files:  # bf16: PyTorch only, no ONNX latency
            gd = gate.to_dict()
            table.append({"variant": k, "ort_ms": None, "openvino_ms": None, "gate": gd["line"], "passed": gd["passed"],
                          "drop": gd["drop"], "drop_high": gd["drop_high"], "agreement": gd["agreement"],
                          "accuracy_fp32": gd["accuracy_fp32"], "accuracy_int8": gd["accuracy_int8"],
                          "confident_agreement": gd["confident_agreement"], "noise_floor": None,
                          "int8_mac_share": 0.0})
    result = {"date": started, "cpu": _cpu(), "commit": args.commit or _commit(), "run": str(args.run), "threads": args.threads,
              "spec": spec.text(), "photos": auto.report["photos"], "table": table,
              "recipe_trials": auto.report["recipe"], "broken": broken.gate.line(),
              "sensitivity_top": auto.report.get("sensitivity", {}).get("ranking", [])[:10],
              "sensitivity_baseline": auto.report.get("sensitivity", {}).get("baseline"),
              "fallback": auto.report.get("fallback"), "report": {k: str(v) for k, v in paths.items()},
              "versions": {"python": sys.version.split()[0]}}
    try:
        import onnxruntime
        import openvino

        result["versions"].update(onnxruntime=onnxruntime.__version__, openvino=openvino.__version__)
    except ImportError:
        pass
    (work / "int8_gate.json").write_text(json.dumps(result, indent=1, default=float))
    md = render(table)
    (work / "int8_gate.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
