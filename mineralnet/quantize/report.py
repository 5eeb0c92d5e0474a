"""The quantization report: why an int8 model loses what it loses.

- per quantized activation tensor: its int8 range and scale, the share of held-out values clipped by that
  range, and the signal-to-quantization-noise ratio (SQNR) locally (the tensor before vs after its own
  QuantizeLinear/DequantizeLinear pair, in the QDQ model) and accumulated (the float model's tensor vs the
  QDQ model's dequantized one: all the error up to that point), with onnxruntime's qdq_loss_debug
  (`modify_model_output_intermediate_tensors` to expose the tensors, `create_activation_matching` to pair
  them; the SQNR is accumulated batch by batch, equal to `compute_signal_to_quantization_noice_ratio` over
  all images, without holding every activation of every photo in memory);
- per weight: SQNR (`create_weight_matching` + `compute_weight_error`) and the worst output channel's SQNR;
- a sensitivity ranking: the logit SQNR gain (and top-1 flips / agreement / accuracy change) when each int8 node
  alone is left in float (`graph.float_nodes`, no recalibration), on the photos given (the ranking split);
- the photos whose answer flipped, with their fp32 margin.

Written as JSON + a markdown table + a PNG (SQNR by tensor, in graph order).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from mineralnet.quantize import graph as g
from mineralnet.quantize.stats import top2_margin


def _sqnr(signal_sq: float, noise_sq: float) -> float:
    eps = np.finfo(float).eps
    return 20 * math.log10(max(math.sqrt(signal_sq), eps) / max(math.sqrt(noise_sq), eps))


def _q_params(qdq) -> dict[str, dict]:
    """activation tensor -> {scale, zero_point, qmin, qmax} of the QuantizeLinear that reads it."""
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    out = {}
    for node in qdq.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits:
            continue
        scale = inits.get(node.input[1])
        zp = inits.get(node.input[2]) if len(node.input) > 2 else np.zeros((), np.uint8)
        if scale is None or zp is None or scale.size != 1:
            continue
        info = np.iinfo(zp.dtype)
        out[node.input[0]] = {"scale": float(scale.ravel()[0]), "zero_point": int(zp.ravel()[0]),
                              "qmin": int(info.min), "qmax": int(info.max), "dtype": str(zp.dtype)}
    return out


def folded_activations(pre_fp32, qdq) -> dict[str, tuple[float, float]]:
    """Tensors whose Relu/Clip ONNX Runtime folded into the QuantizeLinear (the QDQ model computes them with
    the Conv before them and lets the int8 range clip): name -> the activation's (low, high). Their pre-Q/DQ
    values in the QDQ model are the Conv's, before the activation; the statistics apply it first, so that the
    clipped share and the local SQNR measure quantization, not the Relu."""
    from onnx import numpy_helper

    fp, q = g.load(pre_fp32), g.load(qdq)
    inits = {t.name: numpy_helper.to_array(t) for t in fp.graph.initializer}
    q_producer = {o: n.op_type for n in q.graph.node for o in n.output}
    out = {}
    for node in fp.graph.node:
        if node.op_type not in g.FOLDED_ACTIVATIONS or q_producer.get(node.output[0]) == node.op_type:
            continue
        low, high = 0.0, math.inf
        if node.op_type == "Clip":
            low = float(inits[node.input[1]]) if len(node.input) > 1 and node.input[1] in inits else -math.inf
            high = float(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] in inits else math.inf
        out[node.output[0]] = (low, high)
    return out


def tensor_stats(pre_fp32: bytes, qdq: bytes, images: np.ndarray, batch: int = 8) -> list[dict]:
    """Per quantized activation: range, scale, clipped share, local and accumulated SQNR (graph order)."""
    from onnxruntime.quantization.qdq_loss_debug import (create_activation_matching,
                                                         modify_model_output_intermediate_tensors)

    params = _q_params(g.load(qdq))
    folded = folded_activations(pre_fp32, qdq)
    sums: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="mineralnet-qdebug-") as tmp:
        paths = {}
        for name, data in (("float", pre_fp32), ("qdq", qdq)):
            src, aug = Path(tmp) / f"{name}.onnx", Path(tmp) / f"{name}.aug.onnx"
            src.write_bytes(data)
            modify_model_output_intermediate_tensors(os.fspath(src), os.fspath(aug))
            paths[name] = aug
        sessions = {k: g.session(v, optimization="disable") for k, v in paths.items()}
        fixed = g.fixed_batch(sessions["qdq"])
        for x, n in g.batches(images, fixed or batch, fixed):
            acts = {}
            for key, sess in sessions.items():
                inp = sess.get_inputs()[0].name
                names = [o.name for o in sess.get_outputs()]
                suffix = "_ReshapedSavedOutput"
                acts[key] = {o[:-len(suffix)]: [v] for o, v in zip(names, sess.run(names, {inp: x}))
                             if o.endswith(suffix)}
            matched = create_activation_matching(acts["qdq"], acts["float"])
            for name, m in matched.items():
                pre = np.asarray(m["pre_qdq"][0], np.float64)
                if name in folded:
                    pre = np.clip(pre, *folded[name])
                post = np.asarray(m["post_qdq"][0], np.float64)
                ref = np.asarray(m["float"][0], np.float64) if m.get("float") else None
                if n < len(x) and pre.size % len(x) == 0:  # padding rows of a fixed batch: drop them
                    keep = pre.size // len(x) * n
                    pre, post = pre[:keep], post[:keep]
                    ref = ref[:keep] if ref is not None and ref.size == pre.size // n * len(x) else ref
                s = sums.setdefault(name, {"signal": 0.0, "local_noise": 0.0, "float": 0.0, "acc_noise": 0.0,
                                           "values": 0, "clipped": 0, "min": math.inf, "max": -math.inf,
                                           "has_float": ref is not None and ref.shape == post.shape})
                s["signal"] += float((pre ** 2).sum())
                s["local_noise"] += float(((pre - post) ** 2).sum())
                if s["has_float"] and ref is not None and ref.shape == post.shape:
                    s["float"] += float((ref ** 2).sum())
                    s["acc_noise"] += float(((ref - post) ** 2).sum())
                s["values"] += pre.size
                s["min"], s["max"] = min(s["min"], float(pre.min())), max(s["max"], float(pre.max()))
                q = params.get(name)
                if q:
                    lo = q["scale"] * (q["qmin"] - q["zero_point"]) - q["scale"] / 2
                    hi = q["scale"] * (q["qmax"] - q["zero_point"]) + q["scale"] / 2
                    s["clipped"] += int(((pre < lo) | (pre > hi)).sum())
    order = {}
    for i, node in enumerate(g.load(qdq).graph.node):
        for name in (*node.input, *node.output):
            order.setdefault(name, i)
    rows = []
    for name, s in sorted(sums.items(), key=lambda kv: order.get(kv[0], 1 << 30)):
        q = params.get(name, {})
        rows.append({
            "tensor": name, "dtype": q.get("dtype"), "scale": q.get("scale"), "zero_point": q.get("zero_point"),
            "range": ([q["scale"] * (q["qmin"] - q["zero_point"]), q["scale"] * (q["qmax"] - q["zero_point"])]
                      if q else None),
            "observed": [s["min"], s["max"]], "clipped_share": s["clipped"] / s["values"] if s["values"] else 0.0,
            "sqnr_local_db": _sqnr(s["signal"], s["local_noise"]),
            "sqnr_accumulated_db": _sqnr(s["float"], s["acc_noise"]) if s["has_float"] else None,
        })
    return rows


def weight_stats(pre_fp32: bytes, qdq: bytes) -> list[dict]:
    """Per quantized weight: overall SQNR and its worst output channel (axis 0)."""
    from onnxruntime.quantization.qdq_loss_debug import compute_weight_error, create_weight_matching

    with tempfile.TemporaryDirectory(prefix="mineralnet-qdebug-") as tmp:
        fp, qp = Path(tmp) / "float.onnx", Path(tmp) / "qdq.onnx"
        fp.write_bytes(pre_fp32)
        qp.write_bytes(qdq)
        matched = create_weight_matching(os.fspath(fp), os.fspath(qp))
    overall = compute_weight_error(matched)
    rows = []
    for name, m in matched.items():
        w, d = np.asarray(m["float"], np.float64), np.asarray(m["dequantized"], np.float64).reshape(m["float"].shape)
        if w.ndim < 2:
            continue  # biases (int32, exact to ~1e-9) are not where int8 loses
        # an all-zero channel is exact in int8 (SQNR +inf), not 0 dB
        per = [_sqnr(float((w[c] ** 2).sum()), float(((w[c] - d[c]) ** 2).sum())) if np.any(w[c]) else math.inf
               for c in range(w.shape[0])]
        worst = int(np.argmin(per))
        rows.append({"weight": name, "shape": list(w.shape), "sqnr_db": float(overall[name]),
                     "worst_channel": worst, "worst_channel_sqnr_db": float(per[worst]),
                     "median_channel_sqnr_db": float(np.median(per))})
    return rows


def sensitivity(pre_fp32: bytes, qdq: bytes, images: np.ndarray, labels=None, nodes: Sequence[str] | None = None,
                reference: np.ndarray | None = None, log=None) -> dict:
    """Leave each int8 node alone in float and measure, on `images`, how much closer the logits come to
    fp32's: the logit SQNR gain (a continuous signal), and the flips/agreement/accuracy.

    Returns {"images", "baseline": {...}, "ranking": [rows, most sensitive first]}: a node ranks higher the
    more logit SQNR floating it adds (`sqnr_gain_db`). Not by flips first: on photos the model answers with
    large margins int8 flips almost none (measured on the cp7 run: 2 of 979 augmented training photos,
    against 7 of its 165 validation photos), so flips cannot tell the nodes apart, while the logit error
    every photo carries can."""
    from mineralnet.quantize.recipe import logit_sqnr_db

    proto = g.load(qdq)
    reference = g.logits(g.session(pre_fp32), images) if reference is None else reference
    ref_top = reference.argmax(1)
    y = None if labels is None else np.asarray(labels)

    def measure(model) -> dict:
        got = g.logits(g.session(model), images)
        top = got.argmax(1)
        row = {"flips": int((top != ref_top).sum()), "agreement": float((top == ref_top).mean()),
               "logit_sqnr_db": logit_sqnr_db(reference, got)}
        if y is not None:
            row["accuracy"] = float((top == y).mean())
        return row

    base = measure(proto)
    modules = g.module_names(g.load(pre_fp32))
    rows = []
    for i, name in enumerate(nodes if nodes is not None else g.int8_nodes(proto)):
        row = {"node": name, **({"module": modules[name]} if name in modules else {}),
               **measure(g.float_nodes(proto, pre_fp32, [name]))}
        row["agreement_gain"] = row["agreement"] - base["agreement"]
        row["sqnr_gain_db"] = row["logit_sqnr_db"] - base["logit_sqnr_db"]
        if y is not None:
            row["accuracy_gain"] = row["accuracy"] - base["accuracy"]
        rows.append(row)
        if log and (i + 1) % 10 == 0:
            log(f"  sensitivity: {i + 1} nodes measured")
    rows.sort(key=lambda r: (-r["logit_sqnr_db"], r["flips"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return {"images": int(len(images)), "baseline": base, "ranking": rows}


def flipped_photos(fp32_logits: np.ndarray, int8_logits: np.ndarray, files: Sequence[str] | None = None,
                   labels=None, classes: Sequence[str] | None = None) -> list[dict]:
    """Photos whose top-1 differs between fp32 and int8, with fp32's top-1/top-2 probability margin."""
    a, b = fp32_logits.argmax(1), int8_logits.argmax(1)
    margin = top2_margin(fp32_logits)
    name = (lambda i: classes[i]) if classes else (lambda i: int(i))
    out = []
    for i in np.flatnonzero(a != b):
        row = {"photo": os.path.basename(files[i]) if files else int(i), "fp32": name(a[i]), "int8": name(b[i]),
               "fp32_margin": round(float(margin[i]), 4)}
        if labels is not None:
            row["label"] = name(int(labels[i]))
        out.append(row)
    return sorted(out, key=lambda r: -r["fp32_margin"])


def markdown(report: dict, top: int = 15) -> str:
    """The report as markdown tables (the JSON holds every row)."""
    lines = ["# int8 quantization report", ""]
    if report.get("gate"):
        lines += [f"**{report['gate']['line']}**", ""]
    for key in ("recipe", "fallback"):
        if report.get(key):
            lines += [f"## {key}", "", "```json", json.dumps(report[key], indent=1)[:4000], "```", ""]
    sens = report.get("sensitivity")
    if sens:
        b = sens["baseline"]
        lines += [f"## Most sensitive nodes ({sens['images']} ranking photos; full int8: {b['flips']} flips, logit "
                  f"SQNR {b['logit_sqnr_db']:.1f} dB)", "",
                  "| rank | node (left alone in float) | flips | agreement gain | accuracy gain | logit SQNR dB | "
                  "SQNR gain dB |", "|---|---|---|---|---|---|---|"]
        for r in sens["ranking"][:top]:
            acc = f"{100 * r['accuracy_gain']:+.2f} pt" if "accuracy_gain" in r else "-"
            node = f"{r['node']} ({r['module']})" if r.get("module") else r["node"]
            lines.append(f"| {r['rank']} | {node} | {r['flips']} | {100 * r['agreement_gain']:+.2f} pt | {acc} | "
                         f"{r['logit_sqnr_db']:.1f} | {r['sqnr_gain_db']:+.2f} |")
        lines.append("")
    tensors = report.get("tensors")
    if tensors:
        worst = sorted(tensors, key=lambda r: r["sqnr_local_db"])[:top]
        lines += [f"## Activations with the lowest local SQNR ({len(tensors)} quantized tensors)", "",
                  "| tensor | range | scale | clipped | SQNR local dB | SQNR accumulated dB |",
                  "|---|---|---|---|---|---|"]
        for r in worst:
            rng = f"[{r['range'][0]:.3g}, {r['range'][1]:.3g}]" if r["range"] else "-"
            acc = f"{r['sqnr_accumulated_db']:.1f}" if r["sqnr_accumulated_db"] is not None else "-"
            lines.append(f"| {r['tensor']} | {rng} | {r['scale']:.3g} | {100 * r['clipped_share']:.3f}% | "
                         f"{r['sqnr_local_db']:.1f} | {acc} |" if r["scale"] is not None else
                         f"| {r['tensor']} | - | - | - | {r['sqnr_local_db']:.1f} | {acc} |")
        lines.append("")
    weights = report.get("weights")
    if weights:
        lines += ["## Weights with the worst channel", "", "| weight | shape | SQNR dB | worst channel | its SQNR dB |",
                  "|---|---|---|---|---|"]
        for r in sorted(weights, key=lambda r: r["worst_channel_sqnr_db"])[:top]:
            lines.append(f"| {r['weight']} | {r['shape']} | {r['sqnr_db']:.1f} | {r['worst_channel']} | "
                         f"{r['worst_channel_sqnr_db']:.1f} |")
        lines.append("")
    flips = report.get("flipped")
    if flips is not None:
        lines += [f"## Photos whose answer flipped ({len(flips)})", "", "| photo | label | fp32 | int8 | fp32 margin |",
                  "|---|---|---|---|---|"]
        for r in flips[:50]:
            lines.append(f"| {r['photo']} | {r.get('label', '-')} | {r['fp32']} | {r['int8']} | "
                         f"{r['fp32_margin']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path) -> None:
    """SQNR (local and accumulated) of every quantized activation, in graph order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.get("tensors") or []
    fig, ax = plt.subplots(figsize=(max(6, 0.12 * len(rows) + 3), 4))
    xs = np.arange(len(rows))
    ax.plot(xs, [r["sqnr_local_db"] for r in rows], "o-", ms=3, label="local (own Q/DQ)")
    ax.plot(xs, [r["sqnr_accumulated_db"] if r["sqnr_accumulated_db"] is not None else np.nan for r in rows], "s-",
            ms=3, label="accumulated (vs float model)")
    ax.set_xlabel("quantized activation tensor (graph order)")
    ax.set_ylabel("SQNR dB")
    ax.set_title("int8 signal-to-quantization-noise ratio by tensor")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(report: dict, folder, stem: str = "model.int8.report") -> dict[str, Path]:
    """STEM.json, STEM.md and STEM.png in `folder` (atomically); returns their paths."""
    from mineralnet.files import atomic_write_bytes, atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / f"{stem}.json", "md": folder / f"{stem}.md", "png": folder / f"{stem}.png"}
    atomic_write_text(paths["json"], json.dumps(report, indent=1, default=float))
    atomic_write_text(paths["md"], markdown(report))
    with tempfile.TemporaryDirectory(prefix="mineralnet-plot-") as tmp:
        tmp_png = Path(tmp) / "p.png"
        plot(report, tmp_png)
        atomic_write_bytes(paths["png"], tmp_png.read_bytes())
    return paths
