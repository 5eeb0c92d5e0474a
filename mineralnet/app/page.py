"""What the app page shows, as plain data: photo -> fields, model -> model card, fields -> HTML.

    page = Page("runs/exp1")                       # anything `mineralnet predict` takes
    page.answer("photo.jpg", coverage=0.9)         # {"file", "reason", "top", "unknown", "novelty", "set",
                                                   #  "verdict", "cam", "cam_note"}

`top`, `unknown`, `novelty` and `set` are exactly the record of `mineralnet predict MODEL photo --json`
(same Predictor, same decode, same preprocessing); `reason` is the one line `mineralnet data check` prints
for a file it cannot read. Nothing here imports Gradio or writes a file.
"""
from __future__ import annotations

import base64
import html
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from mineralnet.data import load_image
from mineralnet.data.decode import ImageDecodeError
from mineralnet.errors import MineralNetError
from mineralnet.infer import Predictor

TOPK = 5
MAX_PHOTOS = 12  # per request: each photo costs a forward pass and a Grad-CAM
CAM_SIDE = 320  # pixels of the Grad-CAM overlay shown beside each answer


class Page:
    """A model opened once, answering photos one by one for the page.

    Args:
        model: run directory, .onnx file, TensorRT engine or OpenVINO IR (as `mineralnet predict`).
        device: PyTorch device for a run directory (default: CUDA when available).
        topk: candidates listed per photo.
    """

    def __init__(self, model, *, device: str | None = None, topk: int = TOPK):
        self.predictor = Predictor(model, device=device)
        self.topk = max(1, min(int(topk), len(self.predictor.classes)))
        self.card = model_card(model, self.predictor)

    @property
    def calibrated(self) -> bool:
        return self.predictor.calibration is not None

    def answer(self, path, *, coverage: float | None = None, name: str | None = None) -> dict:
        """The displayed fields for one photo (`name`: the file name shown, default the path's)."""
        name = name or Path(path).name
        preprocess = self.predictor.preprocess  # None for an ensemble: each member preprocesses the photo itself
        try:
            image = load_image(path, min_size=preprocess.min_size if preprocess is not None else None)
        except ImageDecodeError as e:
            return {"file": name, "reason": e.reason}
        x = preprocess.batch([image]) if preprocess is not None else [image]  # (1, 3, S, S), or the photo
        pred = self.predictor.predict(x, topk=self.topk, coverage=coverage if self.calibrated else None)[0]
        fields = {**pred.to_dict(), "file": name, "reason": None}
        fields["verdict"] = verdict(fields, self.predictor)
        fields["cam"], fields["cam_note"] = None, None
        if self.predictor.kind == "pytorch":
            fields["cam"], fields["cam_note"] = self.grad_cam(image, x, pred.top[0][0])
        elif self.predictor.kind == "ensemble":
            fields["cam_note"] = "no Grad-CAM for an ensemble: its members look at the photo each in their own way"
        return fields

    def answer_all(self, paths: Sequence, *, names: Sequence[str] | None = None, coverage: float | None = None,
                   max_photos: int = MAX_PHOTOS) -> list[dict]:
        """Fields for each photo, at most `max_photos`; the rest are answered with one refusal line."""
        names = list(names) if names is not None else [Path(p).name for p in paths]
        out = [self.answer(p, coverage=coverage, name=n) for p, n in zip(paths[:max_photos], names)]
        if len(paths) > max_photos:
            out.append({"file": f"{len(paths) - max_photos} more photo(s)",
                        "reason": f"only {max_photos} photos are answered at a time (--max-photos); "
                                  f"drop the others in again"})
        return out

    def grad_cam(self, image: np.ndarray, x: np.ndarray, label: str) -> tuple[np.ndarray | None, str | None]:
        """(overlay (CAM_SIDE, CAM_SIDE, 3) uint8 of where the model finds `label`, None) or (None, why not)."""
        import torch

        from mineralnet.analysis.explain import grad_cam

        backend = self.predictor.backend
        target = torch.tensor([self.predictor.classes.index(label)])
        cam = grad_cam(backend.model, torch.from_numpy(x).to(backend.device), target=target.to(backend.device))
        cam = cam["cam"][0].float().cpu().numpy()  # (S, S) in 0..1
        if float(cam.max()) <= 0:
            return None, f"no positive evidence for {label} anywhere in the photo"
        meta = self.predictor.meta
        return overlay(model_crop(image, int(meta["image_size"]), int(meta["resize"])), cam), None


def model_crop(image: np.ndarray, image_size: int, resize: int) -> np.ndarray:
    """The part of a decoded photo the model sees (shorter side scaled to `resize`, centre `image_size`
    crop), cut from the full photo so it shows at more than the model's resolution."""
    h, w = image.shape[:2]
    s = resize / min(h, w)
    side = image_size / s
    top = ((round(h * s) - image_size) // 2) / s
    left = ((round(w * s) - image_size) // 2) / s
    t, l = int(round(top)), int(round(left))
    return image[t:t + int(round(side)), l:l + int(round(side))]


def overlay(crop: np.ndarray, cam: np.ndarray, side: int = CAM_SIDE, alpha: float = 0.45) -> np.ndarray:
    """A jet-coloured Grad-CAM (0..1) blended over the crop, both resized to side x side -> uint8 RGB."""
    import cv2

    base = cv2.resize(crop, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)
    heat = cv2.resize(cam.astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap(np.uint8(np.clip(heat, 0, 1) * 255), cv2.COLORMAP_JET)[:, :, ::-1]  # BGR -> RGB
    return np.uint8(np.clip((1 - alpha) * base + alpha * heat, 0, 255))


def verdict(fields: dict, predictor: Predictor) -> str:
    """The one sentence at the top of a photo's answer."""
    label, prob = fields["top"][0]["label"], fields["top"][0]["prob"]
    if fields["unknown"]:
        return (f"Unknown mineral: this photo is not like the {len(predictor.classes)} minerals the model knows "
                f"(novelty {fields['novelty']:.3g} above {_threshold(predictor):.3g}); the closest is "
                f"{label} ({percent(prob)})")
    if fields["unknown"] is None:
        return (f"{label} ({percent(prob)}); the model is not calibrated, so there is no unknown-mineral check "
                f"(`mineralnet calibrate RUN`)")
    return f"{label} ({percent(prob)}), a mineral the model knows (novelty {fields['novelty']:.3g})"


def _threshold(predictor: Predictor) -> float:
    """The novelty above which a photo is unknown: the calibration's, or an uncalibrated ensemble's own."""
    if predictor.calibration is not None:
        return predictor.calibration.threshold
    novelty = predictor.ensemble.novelty
    return float(novelty["thresholds"][novelty.get("detector", "energy")])


def percent(p: float) -> str:
    return f"{100 * p:.1f}%"


# ----------------------------------------------------------------------------- model card
def _weights_file(model) -> Path:
    from mineralnet.artifact import MODEL_FILE

    p = Path(os.path.expanduser(os.fspath(model)))
    return p / MODEL_FILE if p.is_dir() else p


def training_photos(model, classes: Sequence[str]) -> dict[str, int] | None:
    """Training photos per class from the run's split file, or None when the model carries no run."""
    from mineralnet.artifact import run_of
    from mineralnet.runs import read_split

    root = run_of(os.path.expanduser(os.fspath(model)))
    if root is not None:
        try:
            split = read_split(root)
        except MineralNetError:
            return None
        labels = [label for _, label in split["splits"].get("train", [])]
        names = split["classes"]
        counts = {c: 0 for c in classes}
        for label in labels:
            if 0 <= label < len(names) and names[label] in counts:
                counts[names[label]] += 1
        return counts
    return None


def model_card(model, predictor: Predictor) -> dict:
    """classes, training photos per class (None without the run's split), validation top1 / mean class
    accuracy (None when not recorded), the date of the weights, backbone, stages, runtime, calibration."""
    if predictor.ensemble is not None:
        return _ensemble_card(model, predictor)
    meta = predictor.meta
    metrics = meta.get("metrics") or {}
    try:
        date = time.strftime("%Y-%m-%d", time.gmtime(_weights_file(model).stat().st_mtime))
    except OSError:
        date = None
    return {"classes": list(predictor.classes),
            "train_photos": training_photos(model, predictor.classes),
            "top1": metrics.get("top1"), "mean_class_acc": metrics.get("mean_class_acc"),
            "val_images": metrics.get("val_images"), "date": date, "backbone": meta.get("backbone"),
            "stages": meta.get("stages"), "image_size": meta.get("image_size"), "runtime": predictor.kind,
            "calibrated": predictor.calibration is not None, "model": os.fspath(model)}


def _ensemble_card(model, predictor: Predictor) -> dict:
    """The card of an ensemble folder: its members' backbones and sizes, its own evaluation on the photos every
    member held out (ENS/eval/, written by `mineralnet ensemble`), the date of its ensemble.json."""
    from mineralnet.infer.ensemble import ENSEMBLE_FILE
    from mineralnet.runs import RunDir

    path = Path(os.path.expanduser(os.fspath(model)))
    metrics = RunDir(path).eval_metrics() or {}
    members = predictor.meta["members"]
    return {"classes": list(predictor.classes), "train_photos": None, "top1": metrics.get("top1"),
            "mean_class_acc": metrics.get("mean_class_acc"), "val_images": metrics.get("n"),
            "date": time.strftime("%Y-%m-%d", time.gmtime((path / ENSEMBLE_FILE).stat().st_mtime)),
            "backbone": f"ensemble of {len(members)}: " + " + ".join(str(m.get("backbone")) for m in members),
            "stages": members[0].get("stages"), "image_size": "/".join(str(m.get("image_size")) for m in members),
            "runtime": predictor.kind, "model": os.fspath(model),
            # `unknown` is flagged from `mineralnet ensemble` on (its thresholds); calibrate adds T and the sets
            "calibrated": predictor.calibration is not None or bool(predictor.ensemble.novelty.get("thresholds"))}


def card_markdown(card: dict) -> str:
    """The model card as Markdown (shown at the top of the page)."""
    def acc(v):
        return "not recorded" if v is None else percent(v)

    photos = card["train_photos"]
    classes = ", ".join(f"{c} ({photos[c]})" for c in card["classes"]) if photos else ", ".join(card["classes"])
    val = f" on {card['val_images']} validation photos" if card["val_images"] else ""
    stages = "+".join(f"F{s}" for s in card["stages"]) if card["stages"] else "?"
    lines = [f"**Model** `{card['model']}` ({card['runtime']}), trained {card['date'] or 'on an unknown date'}: "
             f"{card['backbone'] or 'unknown backbone'}, stages {stages}, {card['image_size']} px",
             f"**Validation**: Top1 {acc(card['top1'])}, mean class accuracy {acc(card['mean_class_acc'])}{val}",
             f"**{len(card['classes'])} minerals**" + (" (training photos)" if photos else "") + f": {classes}",
             "**Unknown minerals**: " + ("flagged (calibrated run)" if card["calibrated"] else
                                         "not checked: the run is not calibrated (`mineralnet calibrate RUN`)")]
    return "\n\n".join(lines)


# ----------------------------------------------------------------------------- HTML
def _jpeg_data_uri(rgb: np.ndarray) -> str:
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 85])
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def answer_html(fields: dict) -> str:
    """One photo's answer as an HTML block (names escaped: they come from the uploader)."""
    name = html.escape(fields["file"])
    if fields.get("reason"):
        return f'<div class="mn-answer mn-refused"><p><b>{name}</b>: {html.escape(fields["reason"])}</p></div>'
    rows = "".join(f"<tr><td>{html.escape(c['label'])}</td><td>{percent(c['prob'])}</td></tr>"
                   for c in fields["top"])
    parts = [f'<div class="mn-answer"><p><b>{name}</b></p>',
             f'<p class="mn-verdict">{html.escape(fields["verdict"])}</p>',
             f"<table><tr><th>candidate</th><th>probability</th></tr>{rows}</table>"]
    if fields.get("set") is not None:
        parts.append(f'<p class="mn-set">candidate set: {html.escape(", ".join(fields["set"]))}</p>')
    if fields.get("cam") is not None:
        parts.append(f'<p>where the model sees {html.escape(fields["top"][0]["label"])} (Grad-CAM, red = strongest):'
                     f'</p><img class="mn-cam" alt="Grad-CAM" src="{_jpeg_data_uri(fields["cam"])}">')
    elif fields.get("cam_note"):
        parts.append(f"<p>{html.escape(fields['cam_note'])}</p>")
    return "".join(parts) + "</div>"


def answers_html(answers: Sequence[dict], coverage: float | None = None) -> str:
    if not answers:
        return "<p>Drop one or several photos above.</p>"
    head = f"<p>candidate sets hold the true mineral for {percent(coverage)} of photos like the validation " \
           f"photos</p>" if coverage is not None and any(a.get("set") is not None for a in answers) else ""
    return head + "".join(answer_html(a) for a in answers)
