"""fit(): one training run from a laptop CPU to many GPUs.

    run = RunDir.open(...)                 # create or resume; owns every file in the run
    parts = setup(cfg, accelerator, run)   # data, model, loss, optimiser, schedule, EMA: built once
    for each epoch: train_one_epoch -> validate -> end_epoch -> time budget

Accelerate owns devices, DDP, mixed precision and gathering. `batch_size` is the GLOBAL batch:
the loader yields global batches and Accelerate splits each one over the processes
(`split_batches=True`), so R processes see exactly the batches one process would see. Every
sample's augmentation is seeded by (seed, epoch, index), so data order and augmentation do not
depend on the process count, the worker count, or on a resume in the middle of an epoch.
"""
from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mineralnet import data as mdata
from mineralnet.config import TrainConfig
from mineralnet.errors import MineralNetError
from mineralnet.losses import DistillationLoss, build_loss
from mineralnet.metrics import confusion_matrix, summarize
from mineralnet.model import FusionNet
from mineralnet.precision import cpu_flags, resolve_precision
from mineralnet.report import write_eval_report
from mineralnet.artifact import MODEL_FILE, model_meta, read_meta
from mineralnet.runs import RunDir, default_run_path
from mineralnet.threads import apply_threads
from mineralnet.train.inputs import DataSplit, build_device_augment, build_loaders, prepare_data
from mineralnet.train.shard_inputs import build_shard_loaders, is_shards, prepare_shards
from mineralnet.infer.loop import evaluate
from mineralnet.train.loop import any_process, fresh_accelerator, train_one_epoch
from mineralnet.train.teacher import teacher_table
from mineralnet.train.state import LRControl, ModelEma, Progress, StopFlag, build_optimizer
from mineralnet.weights import resolve_pretrained


@dataclass
class TrainParts:
    """Everything training builds once, prepared for the accelerator."""
    cfg: TrainConfig
    run: RunDir
    split: DataSplit
    model: Any             # prepared (DDP-wrapped when distributed)
    loss_fn: Any
    optimizer: Any
    train_loader: Any
    val_loader: Any
    lr_control: LRControl
    progress: Progress
    ema: ModelEma | None
    mix: Any               # data.BatchMix or None
    writer: Any = None     # TensorBoard SummaryWriter on the main process
    threads: str = ""      # intra-op threads per process and why, for the header line
    augment: Any = None    # data.DeviceAugment when augmentation runs on the device (--augment-on), else None
    teacher: Any = None    # --teacher: (N_train, C) log-probabilities on the device, row i = training photo i
    qat: Any = None        # --qat: quantize.qat.Qat, the fake quantization attached to the model

    @property
    def unwrapped(self):
        return self.model.module if hasattr(self.model, "module") else self.model

    @property
    def best_source(self):
        """The weights that are validated, kept and exported: the EMA when there is one."""
        return self.ema.model if self.ema is not None else self.unwrapped


# How long a rank waits in a collective before the run fails. The photos are prepared by all ranks together
# (the index shares out the reading), so no rank idles through another's preparation; the bound is for a
# first index of a very large collection on slow storage. MINERALNET_DDP_TIMEOUT_MIN changes it.
DDP_TIMEOUT_MIN = 60


def make_accelerator(cfg: TrainConfig):
    import os
    from datetime import timedelta

    from accelerate import DataLoaderConfiguration, InitProcessGroupKwargs

    mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision]
    if cfg.precision == "fp16" and not torch.cuda.is_available():
        raise MineralNetError("--precision fp16 needs a CUDA GPU; on CPU use --precision bf16 or fp32")
    # non_blocking: host-to-device copies from the pinned batches (pin_memory on CUDA) overlap the step
    loading = DataLoaderConfiguration(split_batches=True, non_blocking=torch.cuda.is_available())
    timeout = timedelta(minutes=float(os.environ.get("MINERALNET_DDP_TIMEOUT_MIN", DDP_TIMEOUT_MIN)))
    return fresh_accelerator(mixed_precision=mp, dataloader_config=loading, step_scheduler_with_optimizer=False,
                             kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)])


def _check_setup(cfg: TrainConfig, accelerator) -> None:
    R = accelerator.num_processes
    if cfg.batch_size % R:
        raise MineralNetError(f"--batch-size {cfg.batch_size} does not divide over {R} processes; use a multiple "
                              f"of {R} (it is the GLOBAL batch)")
    if cfg.sync_bn and accelerator.device.type != "cuda":
        raise MineralNetError("--sync-bn needs CUDA GPUs (SyncBatchNorm is unavailable on CPU); drop the flag")


def open_run(cfg: TrainConfig, accelerator) -> RunDir:
    """The run directory (created, or checked for a resume), the same on every process."""
    from accelerate.utils import broadcast_object_list

    main = accelerator.is_main_process
    if cfg.data is None:  # the demo set: made on every machine (each has its own cache), once per machine
        with accelerator.local_main_process_first():
            cfg.data = str(mdata.make_demo_dataset())
    path = Path(cfg.out) if cfg.out else default_run_path(cfg.backbone, cfg.stages, cfg.loss)
    path = Path(broadcast_object_list([str(path)])[0])
    run = RunDir.open(path, resuming=cfg.resume is not None, is_main=main)
    accelerator.wait_for_everyone()
    return run


def _build_model(cfg: TrainConfig, split: DataSplit, run: RunDir, pretrained):
    model = FusionNet(cfg.backbone, cfg.stages, len(split.classes), pretrained=pretrained, drop_rate=cfg.drop_rate)
    if cfg.resume is not None:
        run.check_resume_compatible(split.classes, model.config())
    if cfg.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    prior = mdata.target_distribution(mdata.class_counts([y for _, y in split.train], len(split.classes)),
                                      cfg.sampling)  # the class mix the batches are drawn from
    loss_fn = build_loss(cfg.loss, k=cfg.k, alpha=cfg.alpha, scope=cfg.loss_scope, num_classes=len(split.classes),
                         feature_dim=model.feature_dim, center_weight=cfg.center_weight,
                         label_smoothing=cfg.label_smoothing, logit_adjust=cfg.logit_adjust, prior=prior,
                         equal_sizes=True)  # global batches split evenly, last one dropped (_check_setup)
    return model, loss_fn


def setup(cfg: TrainConfig, accelerator, run: RunDir) -> TrainParts:
    """Data, model, loss, optimiser, schedule, EMA and mixing, prepared; a resumed run's state restored."""
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    # the weights first: a missing weights package or an unreachable hub fails before the photo scan
    pretrained = resolve_pretrained(cfg.pretrained_value, cfg.backbone) if cfg.resume is None else False
    teacher = None
    if is_shards(cfg.data):  # WebDataset shards (`mineralnet data shard`): streamed, the split fixed in them
        if cfg.teacher:
            raise MineralNetError("--teacher needs a photo folder or CSV as --data (a streamed shard has no photo "
                                  "index to look the teacher's soft labels up by); pass the photos themselves")
        split = prepare_shards(cfg, run)
        train_loader, val_loader = build_shard_loaders(cfg, split)
    else:
        split = prepare_data(cfg, run)
        if cfg.qat:
            _check_qat_split(cfg, split)
        train_loader, val_loader = build_loaders(cfg, split, indexed=bool(cfg.teacher))
        teacher = teacher_table(cfg, split, run, accelerator) if cfg.teacher else None
    model, loss_fn = _build_model(cfg, split, run, pretrained)
    augment = build_device_augment(cfg, split)
    qat = _setup_qat(cfg, model, split, run, train_loader, augment) if cfg.qat else None
    if teacher is not None:
        loss_fn = DistillationLoss(loss_fn, cfg.kd_temperature, cfg.kd_weight)
    optimizer = build_optimizer(cfg, model, loss_fn.parameters())
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    if any(True for _ in loss_fn.parameters()):
        loss_fn = accelerator.prepare(loss_fn)
    ema = ModelEma(accelerator.unwrap_model(model), cfg.ema_decay) if cfg.ema_decay else None
    mix = None
    if cfg.mixup or cfg.cutmix:
        mix = mdata.BatchMix(len(split.classes), mixup=cfg.mixup, cutmix=cfg.cutmix, prob=cfg.mix_prob,
                             seed=cfg.seed, rank=accelerator.process_index)
    parts = TrainParts(cfg, run, split, model, loss_fn, optimizer, train_loader, val_loader,
                       LRControl(cfg, optimizer, len(train_loader)), Progress(), ema, mix,
                       augment=augment, teacher=teacher, qat=qat)
    run.write_config(cfg)
    run.write_resume_info(split.classes, accelerator.unwrap_model(model).config())
    if cfg.resume is not None:
        counters = run.load_checkpoint(accelerator, ema)
        parts.lr_control.load_state_dict(counters["lr_control"])
        parts.progress.load_state_dict(counters["progress"])
        if accelerator.is_main_process:
            print(f"resumed {run.path} at epoch {parts.progress.epoch + 1}, step {parts.progress.step_in_epoch}")
    return parts


def _check_qat_split(cfg: TrainConfig, split: DataSplit) -> None:
    """--qat RUN validates on RUN's validation photos: none of them may be trained on."""
    from mineralnet.runs import read_split_if_any, split_photos

    src_val = {p for p, _ in split_photos(read_split_if_any(Path(cfg.qat)), "val")}
    if src_val and src_val != {p for p, _ in split.val}:
        raise MineralNetError(f"the fine-tune would validate on other photos than {cfg.qat!r} did (its split.json): "
                              f"keep its --data, --folds/--fold, --val-split and --split-seed, so no photo it held "
                              f"out is trained on")


def _setup_qat(cfg: TrainConfig, model, split: DataSplit, run: RunDir, train_loader, augment):
    """--qat RUN: RUN's weights into `model` (a new run), the int8 recipe's fake quantization attached, and its
    activation ranges: calibrated on the first training batches and saved (qat.json), or read back on a resume."""
    from mineralnet.artifact import load_model
    from mineralnet.quantize import qat as q
    from mineralnet.quantize.recipe import default_recipe

    source = Path(cfg.qat)
    if cfg.resume is None:
        trained, meta = load_model(source)
        if list(meta["classes"]) != list(split.classes) or trained.config() != model.config():
            raise MineralNetError(f"--qat {str(source)!r} holds a {trained.config()} model of classes "
                                  f"{list(meta['classes'])}, not the {model.config()} model of classes "
                                  f"{list(split.classes)} these flags build; drop the changed model/data flags")
        model.load_state_dict(trained.state_dict())
    reduce_range = cfg.qat_bits == 7 if cfg.qat_bits else default_recipe().reduce_range
    qat = q.attach(model, reduce_range=reduce_range, image_size=cfg.image_size)
    saved = q.read_saved(run.path) if cfg.resume is not None else None
    if saved is not None:
        qat.load_ranges(saved["ranges"])
    else:
        train_loader.dataset.set_epoch(0)

        def batches():
            for i, batch in enumerate(train_loader):
                if i == q.CALIB_BATCHES:
                    return
                x = augment(batch[0]) if augment is not None else batch[0]
                yield x.to(next(model.parameters()).device)

        qat.calibrate(batches())
        if run.is_main:
            qat.save(run.path, str(source))
    return qat


def save_checkpoint(parts: TrainParts, accelerator) -> None:
    counters = {"lr_control": parts.lr_control.state_dict(), "progress": parts.progress.state_dict()}
    parts.run.save_checkpoint(accelerator, counters, parts.ema)


def fit(cfg: TrainConfig, *, keep_process_group: bool = False) -> dict:
    """Train one model as configured; returns {run_dir, status, train_seconds, best: {top1, mean_class_acc, epoch}}.

    `keep_process_group`: leave a distributed process group alive at the end, for a caller that trains again in the
    same processes (an ensemble preset's members): a destroyed group cannot be rendezvoused again under torchrun.
    """
    cfg.validate()
    threads, why = apply_threads(cfg.threads)  # before any tensor work: `accelerate launch` leaves one thread
    cfg.precision, precision_note = resolve_precision(cfg.precision, torch.cuda.is_available(), cpu_flags())
    accelerator = make_accelerator(cfg)
    if precision_note and accelerator.is_main_process:
        print(f"note: {precision_note}", file=sys.stderr)
    run = None
    try:
        _check_setup(cfg, accelerator)
        run = open_run(cfg, accelerator)
        parts = setup(cfg, accelerator, run)
        parts.threads = f"{threads} thread(s) per process ({why})"
        result = _fit(parts, accelerator)
        # the command that ran the training calibrates the run on this process (calibration.fit.after_training)
        result["main_process"] = accelerator.is_main_process
    finally:
        if run is not None:
            run.release()
        if not keep_process_group:
            accelerator.end_training()
    return result


def _fit(parts: TrainParts, accelerator) -> dict:
    from tqdm.auto import tqdm

    cfg, run, progress, main = parts.cfg, parts.run, parts.progress, accelerator.is_main_process
    if main:
        from torch.utils.tensorboard import SummaryWriter

        parts.writer = SummaryWriter(str(run.tensorboard_dir), purge_step=progress.global_step or None)
        run.truncate_metrics(progress.epoch)
        print(f"training {cfg.backbone} stages {','.join(map(str, cfg.stages))} on {len(parts.split.train)} photos, "
              f"validating on {len(parts.split.val)}, {len(parts.split.classes)} classes, "
              f"{accelerator.num_processes} process(es) on {accelerator.device.type}, "
              f"{parts.threads or f'{torch.get_num_threads()} thread(s) per process'}, global batch "
              f"{cfg.batch_size}, {cfg.precision}; run: {run.path}")
        if parts.qat is not None:
            print(f"quantization-aware fine-tune of {cfg.qat}: {len(parts.qat.convs)} convolutions with "
                  f"{parts.qat.weight_bits}-bit folded weights, {len(parts.qat.acts)} uint8 activations; "
                  f"val top1 below is of the simulated int8 model, the final evaluation of the float weights saved")
    status = "finished"
    with StopFlag() as stop:
        while progress.epoch < cfg.epochs:
            epoch = progress.epoch
            _set_epoch(parts, epoch)
            bar = tqdm(total=len(parts.train_loader), initial=progress.step_in_epoch,
                       desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True,
                       disable=None if main else True)  # None: a bar on a terminal only, never in a log file
            stats = train_one_epoch(parts, accelerator, stop, bar)
            bar.close()
            progress.train_seconds += stats["seconds"]
            if any_process(accelerator, stop.set):
                status = interrupted(parts, accelerator)
                break
            metrics = validate(parts, accelerator)
            end_epoch(parts, accelerator, epoch, stats, metrics)
            if over_budget(parts, accelerator):
                status = "time_budget"
                break
    return finish(parts, accelerator, status)


def _set_epoch(parts: TrainParts, epoch: int) -> None:
    # Accelerate's loader re-sets its sampler and dataset to its own iteration count at every pass (a count
    # that restarts at 0 in a resumed process): set it to the true epoch. Under DDP the loader's set_epoch
    # does not reach our dataset, so set that too.
    parts.train_loader.set_epoch(epoch)
    parts.train_loader.dataset.set_epoch(epoch)
    if parts.augment is not None:
        parts.augment.set_epoch(epoch)


def interrupted(parts: TrainParts, accelerator) -> str:
    """Pre-empted mid-epoch: save where we are and leave cleanly."""
    save_checkpoint(parts, accelerator)
    if accelerator.is_main_process:
        print(f"stopped by signal at epoch {parts.progress.epoch + 1} step {parts.progress.step_in_epoch}; state "
              f"saved. Continue with: mineralnet train --resume {parts.run.path}")
    return "interrupted"


def validate(parts: TrainParts, accelerator) -> dict:
    """Score the kept weights (and the live ones too when an EMA is kept) on the validation photos."""
    t0, n = time.perf_counter(), len(parts.split.classes)
    ev = evaluate(parts.best_source, parts.val_loader, accelerator)
    out = {"ev": ev, "m": summarize(confusion_matrix(ev["targets"], ev["preds"], n)), "live": None}
    if parts.ema is not None:  # the live weights too, to show what the average gains
        live = evaluate(parts.model, parts.val_loader, accelerator)
        out["live"] = summarize(confusion_matrix(live["targets"], live["preds"], n))
    out["seconds"] = time.perf_counter() - t0
    return out


def end_epoch(parts: TrainParts, accelerator, epoch: int, stats: dict, val: dict) -> None:
    """Schedule, best weights, checkpoint, metrics.jsonl, TensorBoard and the epoch's console line."""
    cfg, progress, m = parts.cfg, parts.progress, val["m"]
    parts.lr_control.end_epoch(m["top1"])
    progress.epoch, progress.step_in_epoch = epoch + 1, 0
    improved = m["top1"] > progress.best_top1
    if improved:
        progress.best_top1, progress.best_epoch = m["top1"], epoch + 1
        _save_best(parts, m, epoch)
    save_checkpoint(parts, accelerator)
    if not accelerator.is_main_process:
        return
    line = {"epoch": epoch + 1, "lr": max(g["lr"] for g in parts.optimizer.param_groups), "train_loss": stats["loss"],
            "val_loss": val["ev"]["loss"], "val_top1": m["top1"], "val_mean_class_acc": m["mean_class_acc"],
            "img_per_s": stats["images"] / max(stats["seconds"], 1e-9), "seconds": stats["seconds"],
            "val_seconds": val["seconds"]}
    note = ""
    if val["live"] is not None:
        line.update(val_top1_live=val["live"]["top1"], val_mean_class_acc_live=val["live"]["mean_class_acc"])
        note += f"  (live weights {val['live']['top1']:.4f})"
    if cfg.train_crop_min:
        line["train_crop"] = cfg.train_size_at(epoch)
        note += f"  crop {line['train_crop']}px"
    parts.run.append_metrics(line)
    for key in ("train_loss", "val_loss", "val_top1", "val_mean_class_acc", "img_per_s", "lr",
                "val_top1_live", "val_mean_class_acc_live"):
        if key in line:
            parts.writer.add_scalar(f"epoch/{key}", line[key], epoch + 1)
    print(f"epoch {epoch + 1:>3}/{cfg.epochs}  loss {stats['loss']:.4f}  val top1 {m['top1']:.4f}  "
          f"mean class acc {m['mean_class_acc']:.4f}{note}  {line['img_per_s']:.1f} img/s  "
          f"{stats['seconds']:.0f}s{'  *best' if improved else ''}", flush=True)


def _save_best(parts: TrainParts, m: dict, epoch: int) -> None:
    split, cfg = parts.split, parts.cfg
    metrics = {"top1": m["top1"], "mean_class_acc": m["mean_class_acc"], "epoch": epoch + 1, "val_images": m["n"]}
    extra = {"split": split.split_info}
    if parts.qat is not None:
        extra["qat"] = {"from": str(cfg.qat), "weight_bits": parts.qat.weight_bits,
                        "simulated_int8_top1": m["top1"]}
    if parts.ema is not None:
        extra["ema_decay"] = cfg.ema_decay
    meta = model_meta(parts.unwrapped, classes=split.classes, image_size=cfg.image_size, mean=split.mean,
                      std=split.std, resize=cfg.eval_resize, metrics=metrics, extra=extra)
    parts.run.save_best(parts.best_source, meta)


def over_budget(parts: TrainParts, accelerator) -> bool:
    """The time budget is spent: decided by all processes together, since their clocks differ (more so
    across machines) and one process leaving the loop alone would leave the others waiting for it."""
    cfg, progress = parts.cfg, parts.progress
    if not cfg.max_train_minutes:
        return False
    if not any_process(accelerator, progress.train_seconds > 60 * cfg.max_train_minutes):
        return False
    if accelerator.is_main_process:
        print(f"time budget of {cfg.max_train_minutes} min reached after epoch {progress.epoch}")
    return True


def finish(parts: TrainParts, accelerator, status: str) -> dict:
    """result.json, and (unless interrupted) the best weights' final evaluation in eval/."""
    progress, run = parts.progress, parts.run
    result = {"run_dir": str(run.path), "status": status, "train_seconds": progress.train_seconds,
              "best": {"top1": progress.best_top1, "epoch": progress.best_epoch}}
    if status != "interrupted" and progress.best_epoch > 0:
        result["best"] = final_evaluation(parts, accelerator)
        if parts.qat is not None:  # what validation scored: the model with the int8 rounding simulated
            result["best"]["simulated_int8_top1"] = progress.best_top1
    if accelerator.is_main_process:
        if parts.writer is not None:
            parts.writer.close()
        run.write_result(result)
        if status != "interrupted":
            photo = parts.split.val[0][0] if parts.split.val else None
            print_summary(result, run.path, data=parts.cfg.data, photo=photo)
    return result


def final_evaluation(parts: TrainParts, accelerator) -> dict:
    """Reload the best weights, evaluate the validation split and write eval/ (metrics, plots)."""
    run, classes, model = parts.run, parts.split.classes, parts.unwrapped
    accelerator.wait_for_everyone()
    if parts.qat is not None:  # the saved weights are float: evaluate them as eval/export will (no rounding)
        parts.qat.detach()
    model.load_state_dict(load_file(str(run / MODEL_FILE)))  # copied onto the model's device
    ev = evaluate(model, parts.val_loader, accelerator)
    best = summarize(confusion_matrix(ev["targets"], ev["preds"], len(classes)))
    if accelerator.is_main_process:
        write_eval_report(run.eval_dir, ev["targets"], ev["preds"], ev["probs"], classes)
    epoch = read_meta(run.path)["metrics"].get("epoch")
    return {"top1": best["top1"], "mean_class_acc": best["mean_class_acc"], "epoch": epoch}


def next_commands(run_dir, data=None, photo=None) -> list[str]:
    """The commands worth running after training, with this run's folder, data and a photo filled in."""
    q = shlex.quote
    run, data_arg = q(str(run_dir)), q(str(data)) if data else "<labelled photos>"
    return [f"mineralnet eval {run} --split val",
            f"mineralnet explain {run} --val-only",
            f"mineralnet-export {run} --int8 --calib-data {data_arg}",
            f"mineralnet predict {run} {q(str(photo)) if photo else 'photo.jpg'}"]


def print_summary(result: dict, run_dir: Path, data=None, photo=None) -> None:
    b = result["best"]
    hints = "".join(f"  {c}\n" for c in next_commands(run_dir, data, photo))
    qat = f" (float weights; simulated int8 {b['simulated_int8_top1']:.4f})" if "simulated_int8_top1" in b else ""
    print(f"\nbest val top1 {b['top1']:.4f}{qat}, mean class acc (paper's mAP) "
          f"{b.get('mean_class_acc', float('nan')):.4f} at epoch {b['epoch']}; {result['train_seconds'] / 60:.1f} "
          f"min of training\n"
          f"run: {run_dir}\n" + (f"data: {data}\n" if data else "") + f"next:\n{hints}", end="")
