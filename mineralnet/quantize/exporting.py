"""The int8 gate as `mineralnet-export RUN --int8` uses it: which photos play which part, the bf16 noise
floor, the report beside the export, and the one-line failure.

Photos (see `pipeline`): held-out = --val-data, else the run's validation split (split.json); the
calibration photos = --calib-data (spread, up to --calib-size), else the run's training photos up to 512;
selection/ranking = the run's other training photos (up to 256), else the --calib-data photos not used for
calibration when that folder has class sub-folders of the run's classes. A held-out photo is never used
for calibration or selection.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from mineralnet.errors import MineralNetError
from mineralnet.quantize import pipeline
from mineralnet.quantize.fallback import MIN_INT8_SHARE
from mineralnet.quantize.stats import GateSpec

DEFAULT_CALIB_SIZE = 512
SELECT_SIZE = 256
REPORT_STEM = "model.int8.report"


def spread(items: Sequence, n: int) -> list:
    """`n` items evenly spaced over the list (every class folder is represented)."""
    if n >= len(items):
        return list(items)
    return [items[int(i * len(items) / n)] for i in range(n)]


@dataclass
class PhotoPlan:
    calib: list  # paths
    select: list  # (path, label)
    heldout: list  # (path, label)
    heldout_source: str
    calib_source: str


def plan_photos(run, classes: Sequence[str], *, calib_data=None, calib_size: int | None = None, val_data=None,
                select_size: int = SELECT_SIZE) -> PhotoPlan:
    from mineralnet.data import list_images, scan_dataset
    from mineralnet.runs import read_split_if_any, split_photos

    split = read_split_if_any(run)
    same = bool(val_data and calib_data
                and os.path.realpath(os.fspath(val_data)) == os.path.realpath(os.fspath(calib_data)))
    if val_data and not same:
        heldout = list(scan_dataset(val_data, verify=True, classes=list(classes)).samples)
        heldout_source = "--val-data photos"
    elif split and split["splits"].get("val") and not same:
        heldout = split_photos(split, "val")
        heldout_source = "validation photos of the run"
        if not heldout:
            raise MineralNetError(f"the validation photos listed in {run}/split.json are not at {split['root']}; "
                                  f"pass them with --val-data DIR (labelled class folders)")
    else:
        labelled = _labelled(calib_data, classes) if calib_data else []
        if len(labelled) < 3:
            raise MineralNetError(f"the int8 gate needs held-out labelled photos and {run} has no split.json; pass "
                                  f"--val-data DIR (class folders of photos the model was not trained on)")
        heldout = labelled[1::3]  # every third labelled --calib-data photo, never used for calibration
        heldout_source = ("--val-data photos held out of calibration (--calib-data is the same folder)" if same else
                          "--calib-data photos held out of calibration (no --val-data, no split.json)")
    held = {os.path.abspath(p) for p, _ in heldout}
    train = [(p, y) for p, y in split_photos(split, "train") if os.path.abspath(p) not in held]
    cap = calib_size or DEFAULT_CALIB_SIZE
    if calib_data:
        calib_all = [p for p in list_images(calib_data) if os.path.abspath(p) not in held]
        if not calib_all:
            raise MineralNetError(f"--calib-data {os.fspath(calib_data)!r} holds only held-out photos "
                                  f"({heldout_source}); "
                                  f"calibrate on other photos, e.g. the training set")
        calib = spread(calib_all, cap)
        calib_source = f"--calib-data photos ({len(calib)} of {len(calib_all)})"
        used = {os.path.abspath(p) for p in calib}
        pool = [(p, y) for p, y in train if os.path.abspath(p) not in used]
        if not pool:
            pool = [(p, y) for p, y in _labelled(calib_data, classes) if os.path.abspath(p) not in used | held]
    elif train:
        calib = spread([p for p, _ in train], cap)
        calib_source = f"training photos of the run ({len(calib)} of {len(train)})"
        used = {os.path.abspath(p) for p in calib}
        pool = [(p, y) for p, y in train if os.path.abspath(p) not in used]
    else:
        raise MineralNetError("--int8 needs calibration photos: pass --calib-data DIR (e.g. the training photos), "
                              "or export a run that has its split.json")
    if not calib:
        raise MineralNetError(f"--calib-data {os.fspath(calib_data)!r}: no photos left after removing the "
                              f"held-out ones")
    return PhotoPlan(calib, spread(pool, select_size), heldout, heldout_source, calib_source)


def _labelled(folder, classes) -> list:
    """(path, label) of a class-folder tree of the run's classes; [] when it is not one."""
    from mineralnet.data import scan_dataset

    try:
        return [(p, y) for p, y in scan_dataset(folder, verify=False, classes=list(classes)).samples if y >= 0]
    except (MineralNetError, ValueError, OSError):
        return []


def load_photos(paths: Sequence, preprocess: Callable, labels=None, source: str = "photos") -> pipeline.Photos:
    from mineralnet.data import ImageDecodeError

    arrays, kept, ys = [], [], []
    for i, p in enumerate(paths):
        try:
            arrays.append(preprocess(p))
        except ImageDecodeError:
            continue
        kept.append(p)
        if labels is not None:
            ys.append(labels[i])
    if not arrays:
        return pipeline.Photos(np.zeros((0, 3, 1, 1), np.float32), None, [], source)
    return pipeline.Photos(np.stack(arrays), np.array(ys) if labels is not None else None, kept, source)


def load_photo_sets(plan: PhotoPlan, meta: dict, preprocess: Callable):
    """(calibration, selection, held-out) Photos of `plan`: calibration and held-out through `preprocess` (the
    evaluation preprocessing), selection through the seeded training augmentation (`augmented_preprocess`)."""
    calib = load_photos(plan.calib, preprocess, source=plan.calib_source)
    select = load_photos([p for p, _ in plan.select], augmented_preprocess(meta), [y for _, y in plan.select],
                         "selection photos (training photos not used for calibration, augmented)")
    held = load_photos([p for p, _ in plan.heldout], preprocess, [y for _, y in plan.heldout], plan.heldout_source)
    return calib, select, held


def read_int8_report(run, export=None, prog: str = "mineralnet") -> tuple[Path, dict]:
    """(export folder, its model.int8.report.json) of a run exported with `--int8 --report` (export: default
    RUN/export); one MineralNetError line naming the missing file and the export command otherwise."""
    import json

    from mineralnet.runs import RunDir

    folder = Path(export or RunDir(run).export_dir)
    for need in (f"{REPORT_STEM}.json", "model.onnx"):
        if not (folder / need).is_file():
            raise MineralNetError(f"{prog}: {folder / need} not found: export the run first with "
                                  f"`mineralnet-export {run} --int8 --report` (or name its folder with --export DIR)")
    return folder, json.loads((folder / f"{REPORT_STEM}.json").read_text())


def augmented_preprocess(meta: dict, seed: int = 0) -> Callable:
    """Photo path -> (3, S, S) through the TRAINING augmentation (random resized crop, rotation, flip) with
    a fixed seed. The selection/ranking photos are training photos, which the model answers with large
    margins: int8 flips almost none of them as they are (measured: 0 of 256 for the cp7 run), so they
    could not rank recipes or stop the fallback. Seen through the augmentation they have near-ties as
    unseen photos do, and the held-out photos still take no part."""
    from mineralnet.data import build_transforms, load_image

    t = build_transforms(int(meta["image_size"]), meta["mean"], meta["std"], train=True)
    t.set_random_seed(seed)
    size = getattr(t, "min_decode_size", None)

    def run(path):
        out = t(load_image(path, min_size=size))
        return out.numpy() if hasattr(out, "numpy") else np.asarray(out, np.float32)

    return run


def bf16_logits(model, images: np.ndarray, batch: int = 16) -> np.ndarray:
    """The PyTorch model's logits under CPU bf16 autocast: the agreement a float low precision reaches (the
    noise floor int8 is read against)."""
    import torch

    from mineralnet.infer.loop import predict_array

    out = predict_array(model.float().cpu(), images, batch=batch, device="cpu", autocast_dtype=torch.bfloat16)
    return out["logits"].astype(np.float64)


def gated_int8(fp32_path, *, run, meta: dict, model, preprocess: Callable, out_dir, spec: GateSpec,
               calib_data=None, calib_size: int | None = None, val_data=None, fallback: str = "off",
               search: bool = True, recipe=None, log=None, stem: str = REPORT_STEM,
               broken_calibration: bool = False, ranking: bool = False,
               min_int8_share: float = MIN_INT8_SHARE) -> tuple[pipeline.Int8Result, dict, dict]:
    """Make the int8 model of the fp32 ONNX at `fp32_path`, judge it on held-out photos, write the report
    (always, also when the gate fails) and raise one MineralNetError line when the gate fails.
    Returns (result, record for the export manifest, report paths)."""
    from mineralnet.quantize import report as rp

    log = log or (lambda line: None)
    plan = plan_photos(run, meta["classes"], calib_data=calib_data, calib_size=calib_size, val_data=val_data)
    calib, select, held = load_photo_sets(plan, meta, preprocess)
    if broken_calibration:  # the check that the gate catches bad ranges: a few all-black photos
        black = np.zeros((4, 3, meta["image_size"], meta["image_size"]), np.float32)
        mean, std = np.asarray(meta["mean"], np.float32), np.asarray(meta["std"], np.float32)
        calib = pipeline.Photos(black + (-mean / std)[None, :, None, None], None, None, "4 all-black photos")
    if not len(held):
        raise MineralNetError(f"none of the {len(plan.heldout)} held-out photos could be decoded")
    log(f"int8: calibrating on {len(calib)} {calib.source}, choosing on {len(select)} selection photos, gating on "
        f"{len(held)} {held.source}")
    noise = {"bf16": bf16_logits(model, held.images)} if model is not None else None
    result = pipeline.make_int8(fp32_path, calib, select, held, spec=spec, recipe=recipe, search=search,
                                fallback=fallback, noise=noise, classes=list(meta["classes"]), log=log,
                                ranking=ranking, min_int8_share=min_int8_share)
    result.report["photos"]["calibration_source"] = calib.source
    paths = rp.write(result.report, out_dir, stem)
    gate = result.gate
    record = {"gate": {k: v for k, v in gate.to_dict().items() if k != "spec"} | {"spec": spec.text()},
              "recipe": result.recipe.to_dict(), "recipe_label": result.recipe.label(),
              "report": Path(paths["json"]).name,
              "fallback": result.report.get("fallback", {}).get("floated") if fallback == "auto" else None}
    if not gate.passed:
        hint = ""
        if fallback != "auto":
            hint = "; try --int8-fallback auto"
        elif result.report.get("fallback", {}).get("stopped_by_floor"):  # no ranking photos: no fallback ran
            hint = (f"; the fallback stopped at the {min_int8_share:.0%} floor of MACs in int8 (--int8-min-share: "
                    f"lower it to float more, at the cost of size and speed)")
        raise MineralNetError(failure_line(gate, spec, paths["md"], hint=hint))
    return result, record, paths


def replace_recipe(recipe, activations: str):
    from dataclasses import replace

    if activations not in ("uint8", "int8"):
        raise MineralNetError(f"int8 activations {activations!r}: choose uint8 (x86 CPUs) or int8 (TensorRT, ARM)")
    return replace(recipe, activations=activations)


def heldout_gate(ctx, fp32, int8, *, what: str = "int8 gate", stem: str = REPORT_STEM) -> dict:
    """The int8 gate for any int8 form given two runners (images -> {output: array}): held-out photos as in
    `plan_photos`, `stats.evaluate_gate` with --int8-gate, the report (gate + flipped photos) written to
    ctx.out_dir/STEM.*; one MineralNetError line when it fails. Returns the manifest's int8 record."""
    from mineralnet.quantize import report as rp
    from mineralnet.quantize.stats import evaluate_gate, parse_gate

    o = ctx.options
    spec = parse_gate(o.int8_gate)
    plan = plan_photos(ctx.run, ctx.meta["classes"], calib_data=o.quant_data,
                       calib_size=o.quant_size, val_data=o.val_data)
    held = load_photos([p for p, _ in plan.heldout], ctx.preprocess, [y for _, y in plan.heldout], plan.heldout_source)

    def scores(out: dict) -> np.ndarray:
        return np.asarray(out.get("logits", out.get("probs", next(iter(out.values())))), np.float64)

    ref, got = [], []
    for s in range(0, len(held), 64):
        x = held.images[s:s + 64]
        ref.append(scores(fp32(x)))
        got.append(scores(int8(x)))
    ref, got = np.concatenate(ref), np.concatenate(got)
    gate = evaluate_gate(ref, got, held.labels, spec=spec, source=f"{len(held)} {held.source}")
    report = {"gate": gate.to_dict(), "photos": {"held_out": len(held), "held_out_source": held.source},
              "flipped": rp.flipped_photos(ref, got, held.files, held.labels, list(ctx.meta["classes"]))}
    paths = rp.write(report, ctx.out_dir, stem)
    if not gate.passed:
        raise MineralNetError(failure_line(gate, spec, paths["md"], what=what))
    return {"gate": gate.to_dict(), "report": Path(paths["json"]).name,
            "agreement": {"top1": gate.agreement.value, "images": gate.agreement.n, "source": gate.source},
            "accuracy": {"fp32": gate.accuracy_fp32.value, "int8": gate.accuracy_int8.value,
                         "images": gate.agreement.n}}


def too_few_photos(gate, spec) -> str:
    """'' or a sentence saying that on this many held-out photos one photo lost net already fails `spec`
    (then the verdict rests on one or two near-ties, and more photos, not another recipe, settle it)."""
    from mineralnet.quantize.stats import one_photo_bound, photos_for_one_loss

    n = gate.agreement.n
    if gate.accuracy_fp32 is None or not n:
        return ""
    acc = gate.accuracy_fp32.value
    if one_photo_bound(n, acc, spec.confidence) <= spec.max_bound and 1 / n <= spec.max_drop:
        return ""
    need = photos_for_one_loss(spec, acc)
    return (f"; on {n} photos a single photo lost net already fails the bound (about {need or 'very many'} are "
            f"needed): judge on more held-out photos (--val-data DIR, or train with --val-split 0.2)")


def failure_line(gate, spec, report_path, *, what: str = "int8 gate", hint: str = "") -> str:
    drop = "no labels" if gate.drop is None else f"{100 * gate.drop:.2f} points"
    bound = "-" if gate.drop_high is None else f"{100 * gate.drop_high:.2f}"
    return (f"{what} FAILED, no int8 file written: accuracy drop {drop}, {spec.confidence:.0%} upper bound {bound} "
            f"(limits {100 * spec.max_drop:g} / {100 * spec.max_bound:g}) on {gate.agreement.n} held-out photos; "
            f"report: {report_path}{hint}{too_few_photos(gate, spec)}")
