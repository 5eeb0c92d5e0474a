"""Bench reports: the JSON document, its Markdown rendering, and row-by-row comparison of two reports."""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Optional


from mineralnet.errors import MineralNetError
from mineralnet.bench.harness import OVERSUBSCRIBED, SCHEMA, _short_error
from mineralnet.bench.environment import environment

# ============================================================================ report, Markdown, compare
def make_report(rows: list[dict], *, kind: str, settings: dict, command: Optional[str] = None,
                env: Optional[dict] = None) -> dict:
    return {"schema": SCHEMA, "kind": kind,
            "created": _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds"),
            "command": command, "environment": env or environment(), "settings": settings, "rows": rows}


def _fmt(v, spec=".2f", none="-"):
    return none if v is None else format(v, spec)


def _pct(v):
    return None if v is None else 100 * v


def machine_line(env: dict) -> str:
    cpu, gpu, v = env["cpu"], env.get("gpu"), env["versions"]
    parts = [f"CPU {cpu['model']} ({cpu['physical_cores']} cores, {', '.join(cpu.get('simd') or []) or 'no AVX'}), "
             f"{env['torch_threads']} torch threads"]
    parts.append(f"GPU {gpu['name']} (sm {gpu['capability']}, driver {gpu['driver']}, CUDA {gpu['cuda']})"
                 if gpu else "no GPU")
    parts.append(", ".join(f"{k} {v[k]}" for k in ("torch", "onnxruntime", "tensorrt", "timm", "mineralnet") if v.get(k))
                 + ("" if v.get("tensorrt") else ", no TensorRT"))
    return "; ".join(parts)


def render_markdown(report: dict, title: Optional[str] = None) -> str:
    """Table of measured rows (with the ratio to each group's baseline) and a list of skipped ones."""
    rows, train = report["rows"], report.get("kind") == "train"
    scored = any(r.get("top1") is not None for r in rows)
    out = [f"### {title or ('Training throughput' if train else 'Inference latency and throughput')}", ""]
    out += _conditions(report, scored) + [""]
    out += _table(rows, report.get("settings", {}), train, scored)
    out += _footnotes(rows, train)
    return "\n".join(out) + "\n"


def _conditions(report: dict, scored: bool) -> list[str]:
    """The bullet list above the table: date, machine, command, timing, load, peak, accuracy, notes."""
    rows, env, s = report["rows"], report["environment"], report.get("settings", {})
    out = [f"- Date: {report['created']}", f"- Machine: {machine_line(env)}"]
    if report.get("command"):
        out.append(f"- Command: `{report['command']}`")
    out.append(f"- Timing: warm-up {s.get('warmup_s')} s, then >= {s.get('duration_s')} s and >= "
               f"{s.get('min_runs')} timed runs per row, device-synchronised, inputs rotated over "
               f"{s.get('buffers', s.get('steps_per_epoch'))} buffers"
               + ("; the runtimes of one batch size interleaved in round-robin rounds (one call each per round; "
                  "ONNX Runtime's idle-thread spinning off so that it leaves the cores to the next runtime)"
                  if s.get("interleaved") else ""))
    if env.get("load_average"):
        out.append(_load_line(env, s, rows))
    if s.get("peak_gflops"):
        out.append(f"- Peak: {s['peak_gflops']:.0f} GFLOP/s fp32 ({s.get('peak_source') or 'given with --peak-gflops'})")
    if scored:
        n = next(r["images"] for r in rows if r.get("top1") is not None)
        out.append(f"- Accuracy: every row on the same {n} labelled photos of {s.get('data')}"
                   + (f" (the run's {s['split']} split)" if s.get("split") else "")
                   + "; agreement = share of photos with the same top-1 as the run's PyTorch fp32 model "
                     "(PyTorch rows: the eager model at that precision)")
    if any(r["runtime"] == "openvino" for r in rows):
        out.append("- OpenVINO rows: precision fp32/int8 = the file run with the fp32 inference precision hint; "
                   "bf16 (int8+bf16) = the bf16 hint, which OpenVINO picks by default on CPUs with bf16: not fp32")
    if any(r.get("load_1min") is not None for r in rows):
        out.append("- load: the 1-minute load average when the row's batch size finished (2 CPUs: above 2, other "
                   "processes were competing for the cores)")
    return out


def _load_line(env: dict, s: dict, rows: list[dict]) -> str:
    after = s.get("load_average_after")
    worst = max([env["load_average"][0], (after or [0])[0]] + [r.get("load_1min") or 0 for r in rows])
    return (f"- Load average (1/5/15 min) at start: {'/'.join(map(str, env['load_average']))}"
            + (f", at end: {'/'.join(map(str, after))}" if after else "")
            + f" on {env['cpu'].get('usable_cpus')} CPUs"
            + (": **oversubscribed** (other processes held the cores; multi-threaded rows suffer most, "
               "as their threads wait for each other at every parallel region)"
               if worst > OVERSUBSCRIBED * (env["cpu"].get("usable_cpus") or 1) else ""))


def _table(rows: list[dict], s: dict, train: bool, scored: bool) -> list[str]:
    """The Markdown table of the measured rows, with each row's ratio to its group's baseline."""
    baselines = {r["group"]: r for r in rows if r.get("baseline") and r["status"] == "ok"}
    unit = "step" if train else ""
    ratio_name = s.get("ratio_label") or ("p50 vs bare" if train else "p50 vs torch fp32")
    head = ["model", "runtime", "precision", "device", "batch"] + (["procs x threads"] if train else []) + \
           [f"p50 ms{' /' + unit if unit else ''}", "p90 ms", "p99 ms", "mean ms", "img/s", "runs", "GFLOP/s",
            "% of fp32 peak", ratio_name] + (["top-1", "mean class acc", "agrees w/ torch fp32"] if scored else []) + \
           (["load"] if any(r.get("load_1min") is not None for r in rows) else [])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            continue
        lat, base = r["latency_ms"], baselines.get(r["group"])
        ratio = f"{lat['p50'] / base['latency_ms']['p50']:.2f}x" if base else "-"
        cells = [r["model"], r["runtime"], r["precision"], r["device"], str(r["batch"])]
        if train:
            cells.append(f"{r.get('processes', 1)} x {r.get('threads', '?')}")
        cells += [_fmt(lat["p50"]), _fmt(lat["p90"]), _fmt(lat["p99"]), _fmt(lat["mean"]),
                  _fmt(r["throughput_img_s"], ".1f"), str(r["runs"]), _fmt(r["gflops"], ".1f"),
                  _fmt(None if r["fraction_of_peak"] is None else 100 * r["fraction_of_peak"], ".0f"), ratio]
        if scored:
            cells += [_fmt(_pct(r.get("top1")), ".2f"), _fmt(_pct(r.get("mean_class_acc")), ".2f"),
                      _fmt(_pct(r.get("agreement")), ".2f")]
        if head[-1] == "load":
            cells.append(_fmt(r.get("load_1min"), ".1f"))
        out.append("| " + " | ".join(cells) + " |")
    return out


def _footnotes(rows: list[dict], train: bool) -> list[str]:
    """Below the table: the FLOPs per image, and the rows that were not measured (one line per reason)."""
    out = []
    gflop = next((r["gflop_per_image"] for r in rows if r.get("gflop_per_image")), None)
    if gflop:
        out.append("")
        out.append(f"FLOPs per image ({'forward + backward' if train else 'forward'}, torch.utils.flop_counter, "
                   f"2 per multiply-add): {gflop:.2f} GFLOP. GFLOP/s = FLOPs per image x img/s (from the mean)."
                   + (" For int8 rows it is nominal GOP/s." if any(r["precision"] == "int8" for r in rows) else ""))
    others = [r for r in rows if r["status"] != "ok"]
    if others:
        out += ["", "Not measured:", ""]
        seen = set()
        for r in others:
            key = (r["model"], r["runtime"], r["precision"], r["status"], r["reason"])
            batches = [str(o["batch"]) for o in others if (o["model"], o["runtime"], o["precision"], o["status"],
                                                           o["reason"]) == key]
            if key in seen:
                continue
            seen.add(key)
            out.append(f"- {r['model']} / {r['runtime']} / {r['precision']} (batch {','.join(batches)}): "
                       f"{r['status']}: {r['reason']}")
    return out


def load_report(path: str) -> dict:
    try:
        rep = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise MineralNetError(f"cannot read benchmark JSON {path!r} ({_short_error(e)}); pass files written by "
                              f"`mineralnet bench --json`") from None
    if not isinstance(rep, dict) or rep.get("schema") != SCHEMA:
        raise MineralNetError(f"{path!r} is not a MineralNet benchmark file (schema {SCHEMA}); pass files "
                              f"written by `mineralnet bench --json`")
    return rep


def _row_key(r: dict) -> tuple:
    return (r["model"], r["runtime"], r["precision"], r["batch"], r.get("processes", 1))


def compare_reports(a: dict, b: dict, names: tuple[str, str] = ("A", "B")) -> str:
    """Markdown: rows present in both (matched by model, runtime, precision, batch), with B/A ratios of
    p50 latency and throughput; rows measured in only one are listed."""
    ra = {_row_key(r): r for r in a["rows"] if r["status"] == "ok"}
    rb = {_row_key(r): r for r in b["rows"] if r["status"] == "ok"}
    na, nb = names
    out = [f"A = {na}: {machine_line(a['environment'])}", f"B = {nb}: {machine_line(b['environment'])}", "",
           "| model | runtime | precision | batch | A p50 ms | B p50 ms | B/A latency | A img/s | B img/s | B/A img/s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for k, x in ra.items():
        if k not in rb:
            continue
        y = rb[k]
        pa, pb = x["latency_ms"]["p50"], y["latency_ms"]["p50"]
        out.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {pa:.2f} | {pb:.2f} | {pb / pa:.2f}x | "
                   f"{x['throughput_img_s']:.1f} | {y['throughput_img_s']:.1f} | "
                   f"{y['throughput_img_s'] / x['throughput_img_s']:.2f}x |")
    only = [("A", k) for k in ra if k not in rb] + [("B", k) for k in rb if k not in ra]
    if only:
        out += ["", "Measured in one file only: " + "; ".join(f"{w}: {'/'.join(map(str, k[:4]))}" for w, k in only)]
    return "\n".join(out) + "\n"
