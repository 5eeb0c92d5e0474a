"""A training run's folder: every file and folder name in it, who writes them and the readers.

The model file itself (model.safetensors + model.json) is mineralnet/artifact.py's; RunDir names it
and calls artifact to write it. DESIGN.md section 4 lists the files.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

from mineralnet.artifact import META_FILE, MODEL_FILE, check_state_files, run_of, save_model
from mineralnet.data import load_splits, save_splits
from mineralnet.errors import MineralNetError
from mineralnet.files import atomic_write_json, atomic_write_text, fsync_dir, fsync_tree


# ----------------------------------------------------------------------------- the run directory
# Every name in a run folder is spelled here (model.safetensors / model.json in artifact.py); other modules use
# these constants or RunDir's paths and readers (tests/test_layout.py checks that no other module spells one).
CONFIG_FILE, SPLIT_FILE, METRICS_FILE, RESULT_FILE = "config.yaml", "split.json", "metrics.jsonl", "result.json"
RESUME_FILE, STATE_DIR, PROGRESS_FILE = "resume.json", "state", "progress.json"
STATE_TMP, STATE_OLD = "state.tmp", "state.old"
LOCK_FILE, UNREADABLE_FILE, TENSORBOARD_DIR = ".lock", "unreadable.txt", "tb"
TEACHER_FILE = "teacher.safetensors"  # --teacher: the teacher's log-probabilities of the training photos
EVAL_DIR, EXPORT_DIR = "eval", "export"  # the final evaluation; the default `mineralnet-export` folder
# An ensemble preset (cpu-ensemble): the run is the distilled student; its members and their ensemble live inside it.
MEMBERS_DIR, ENSEMBLE_DIR = "members", "ensemble"
CALIBRATION_FILE, CALIBRATION_ARRAYS = "calibration.json", "calibration.safetensors"  # `mineralnet calibrate`
# The evaluation report in RUN/eval/ (and in any `eval --out` / `explain --out` folder; report.py writes it).
EVAL_METRICS_FILE, EVAL_CLASSES_FILE, EVAL_CONFUSION_FILE = "metrics.json", "per_class.csv", "confusion.png"
# What training itself writes into a run folder; anything else in a folder without config.yaml is not ours.
RUN_NAMES = (CONFIG_FILE, SPLIT_FILE, METRICS_FILE, RESULT_FILE, RESUME_FILE, STATE_DIR, STATE_TMP, STATE_OLD,
             LOCK_FILE, UNREADABLE_FILE, TENSORBOARD_DIR, EVAL_DIR, MODEL_FILE, META_FILE, TEACHER_FILE, MEMBERS_DIR,
             ENSEMBLE_DIR)
# Every name a run folder may hold (training, calibration, export, the eval report).
FILE_NAMES = RUN_NAMES + (EXPORT_DIR, CALIBRATION_FILE, CALIBRATION_ARRAYS, EVAL_METRICS_FILE, EVAL_CLASSES_FILE,
                          EVAL_CONFUSION_FILE)


def _entries(path: Path) -> list[str]:
    """Names in a folder, skipping our own atomic-write temporaries; [] when it does not exist."""
    if not path.is_dir():
        return [path.name] if path.exists() else []
    return [n for n in os.listdir(path) if not (n.startswith(".") and n.endswith(".tmp"))]


class RunDir:
    """A training run's folder and every file training writes into it (DESIGN.md section 4).

    Nothing else spells these names: other modules take the paths (`eval_dir`, `export_dir`, ...) and the
    readers (`saved_config`, `eval_metrics`, `split`, `metrics`, `result`, `has_state`, ...) from here.
    Writes happen on the main process only; checkpoints involve every process.
    """

    def __init__(self, path, is_main: bool = True):
        self.path, self.is_main = Path(path), is_main
        self._lock = None  # open file of RUN/.lock while this process owns the run

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # -- where things are
    @property
    def config_file(self) -> Path:
        return self / CONFIG_FILE

    @property
    def eval_dir(self) -> Path:
        """RUN/eval/: the final evaluation training writes (and `mineralnet eval --split val`)."""
        return self / EVAL_DIR

    @property
    def export_dir(self) -> Path:
        """RUN/export/: where `mineralnet-export` writes by default."""
        return self / EXPORT_DIR

    @property
    def tensorboard_dir(self) -> Path:
        return self / TENSORBOARD_DIR

    @property
    def unreadable_file(self) -> Path:
        return self / UNREADABLE_FILE

    @property
    def members_dir(self) -> Path:
        """An ensemble preset's member runs (m0, m1, ...)."""
        return self / MEMBERS_DIR

    @property
    def ensemble_dir(self) -> Path:
        """An ensemble preset's ensemble folder (ensemble.json, eval/): the student's teacher."""
        return self / ENSEMBLE_DIR

    @property
    def teacher_file(self) -> Path:
        return self / TEACHER_FILE

    @property
    def calibration_files(self) -> tuple[Path, Path]:
        """(calibration.json, calibration.safetensors): the run's open-set calibration."""
        return self / CALIBRATION_FILE, self / CALIBRATION_ARRAYS

    def has_model(self) -> bool:
        return (self / MODEL_FILE).is_file()

    def has_split(self) -> bool:
        return (self / SPLIT_FILE).is_file()

    def has_state(self) -> bool:
        """A checkpoint to resume from: state/, or state.old/ when a swap was cut short."""
        return (self / STATE_DIR).is_dir() or (self / STATE_OLD).is_dir()

    # -- readers
    def saved_config(self) -> dict | None:
        """config.yaml as a dict (the flags the run was trained with); None when there is none."""
        import yaml

        path = self.config_file
        if not path.is_file():
            return None
        try:
            return yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise MineralNetError(f"{str(path)!r} is not readable YAML ({str(e).splitlines()[0]}); restore it "
                                  f"from a copy of the run or start a new run") from None

    def eval_metrics(self, folder: str | None = None) -> dict | None:
        """metrics.json of the run's final evaluation (or of `folder`, e.g. "eval-test"); None when absent."""
        path = (self / (folder or EVAL_DIR)) / EVAL_METRICS_FILE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise MineralNetError(f"{str(path)!r} is damaged ({e}); run `mineralnet eval {self.path}` again") from None

    def split(self, root=None):
        """split.json (see `read_split`)."""
        return read_split(self.path, root=root)

    def metrics(self) -> list[dict]:
        """metrics.jsonl (see `read_metrics`)."""
        return read_metrics(self.path)

    def result(self) -> dict | None:
        return read_result(self.path)

    @classmethod
    def open(cls, path, *, resuming: bool, is_main: bool) -> "RunDir":
        """Create the folder of a new run, or check the folder of a run being resumed."""
        run = cls(path, is_main)
        if is_main:
            foreign = sorted(set(_entries(run.path)) - set(RUN_NAMES))
            if foreign and not (run / CONFIG_FILE).exists():
                raise MineralNetError(f"--out {str(run.path)!r} is a non-empty folder that is not a run (it holds "
                                      f"{foreign[0]!r}); choose a new or empty --out")
            run.path.mkdir(parents=True, exist_ok=True)
            run.lock()
            if not resuming and (run / CONFIG_FILE).exists():
                run.release()
                raise MineralNetError(f"run directory {str(run.path)!r} already holds a run; pass --resume "
                                      f"{run.path} to continue it or choose another --out")
        return run

    def lock(self) -> None:
        """Own the run for the life of this process (advisory flock on RUN/.lock, our PID written in it);
        a second owner fails at once with one line naming the holder."""
        import fcntl

        f = open(self / LOCK_FILE, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise MineralNetError(f"run directory {str(self.path)!r} is in use by process {holder} (a training or "
                                  f"cv into the same --out); wait for it to finish or choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._lock = f

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file drops the flock
            self._lock = None

    # -- configuration and the data the run was made from
    def write_config(self, cfg) -> None:
        if self.is_main:
            atomic_write_text(self / CONFIG_FILE, cfg.to_yaml())

    def write_resume_info(self, classes, model_config: dict) -> None:
        if self.is_main:
            atomic_write_json(self / RESUME_FILE, {"classes": list(classes), "model": model_config})

    def check_resume_compatible(self, classes, model_config: dict) -> None:
        path = self / RESUME_FILE
        if not path.is_file():
            return
        old = json.loads(path.read_text())
        if old["classes"] != list(classes):
            raise MineralNetError(f"cannot resume {str(self.path)!r}: it was trained on classes {old['classes']} "
                                  f"but the data now has {list(classes)}; use the same data or start a new run")
        if old["model"] != model_config:
            raise MineralNetError(f"cannot resume {str(self.path)!r}: it holds a {old['model']} model, not "
                                  f"{model_config}; drop the changed model flags or start a new run")

    def write_split(self, index, train, val, info: dict) -> None:
        """split.json: the run's training and validation photos (one versioned format, `data.save_splits`)."""
        if self.is_main:
            save_splits(self / SPLIT_FILE, index, {"train": train, "val": val}, info=info)

    def write_unreadable(self, bad) -> None:
        if self.is_main and bad:
            atomic_write_text(self / UNREADABLE_FILE, "".join(f"{p}\t{r}\n" for p, r in bad))

    # -- per-epoch records
    def truncate_metrics(self, epochs_done: int) -> None:
        """On resume, drop metric lines of epochs after the restored state (they will be re-run)."""
        path = self / METRICS_FILE
        if self.is_main and path.exists():
            lines = [json.dumps(l) for l in read_metrics(self.path) if l["epoch"] <= epochs_done]
            atomic_write_text(path, "".join(l + "\n" for l in lines))

    def append_metrics(self, line: dict) -> None:
        if self.is_main:
            with open(self / METRICS_FILE, "a") as f:
                f.write(json.dumps(line) + "\n")

    def save_best(self, model, meta: dict) -> None:
        if self.is_main:
            save_model(self.path, model, meta)

    def write_result(self, result: dict) -> None:
        if self.is_main:
            atomic_write_json(self / RESULT_FILE, result)

    # -- checkpoints
    def save_checkpoint(self, accelerator, counters: dict, ema=None) -> None:
        """accelerate save_state + the counters (JSON) + the EMA weights into state/, atomically: write
        state.tmp, then swap it in."""
        tmp, final, old = self / STATE_TMP, self / STATE_DIR, self / STATE_OLD
        if self.is_main and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        if self.is_main:
            atomic_write_json(tmp / PROGRESS_FILE, counters)
            if ema is not None:
                ema.save(tmp)
        fsync_tree(tmp)  # Accelerate does not fsync what it writes; each process its own files
        accelerator.wait_for_everyone()
        if self.is_main:
            if final.exists():
                if old.exists():
                    shutil.rmtree(old)
                os.replace(final, old)
            os.replace(tmp, final)
            fsync_dir(self.path)  # the rename itself is durable before the previous state goes
            if old.exists():
                shutil.rmtree(old)
        accelerator.wait_for_everyone()

    def state_dir(self) -> Path:
        """The folder to resume from: state/, or state.old/ when a swap was cut short."""
        return self / STATE_DIR if (self / STATE_DIR).is_dir() else self / STATE_OLD

    def load_checkpoint(self, accelerator, ema=None) -> dict:
        """Restore model/optimizer/RNG state (+ EMA); returns the saved counters."""
        state = self.state_dir()
        path = state / PROGRESS_FILE
        if not path.is_file():
            raise MineralNetError(f"{str(state)!r} has no {PROGRESS_FILE}: it was saved by an older MineralNet; "
                                  f"start the run again without --resume")
        check_state_files(state)
        if getattr(accelerator, "_custom_objects", None):
            raise MineralNetError("internal: objects registered for checkpointing would be unpickled on resume; "
                                  "MineralNet saves its counters as JSON")
        accelerator.load_state(str(state))
        if ema is not None:
            ema.load(state)
        return _read_json(path)



def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MineralNetError(f"{str(path)!r} is damaged ({e}); start the run again without --resume") from None


@contextlib.contextmanager
def owning(path):
    """Hold RUN/.lock on `path` (created if needed) for the block; nothing when path is None."""
    if not path:
        yield None
        return
    Path(path).mkdir(parents=True, exist_ok=True)
    owner = RunDir(path)
    owner.lock()
    try:
        yield owner
    finally:
        owner.release()


def default_run_path(backbone: str, stages, loss: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{backbone}-s{''.join(map(str, stages))}-{loss}"


def run_folder(run) -> Path:
    """The run folder that owns `run` (`artifact.run_of`), else the file's folder, else `run` itself."""
    p = Path(run)
    return run_of(p) or (p.parent if p.is_file() else p)


def read_split(run, root=None):
    """The split of a run dir (or of the run a model file sits in) -> `data.load_splits`'s dict
    (root, classes, splits: {"train", "val"} -> [(path, label)], info), paths resolved against `root`
    (default: the collection's saved location). Raises when there is none."""
    path = run_folder(run) / SPLIT_FILE
    if not path.is_file():
        raise MineralNetError(f"{str(path)!r} not found: the run was not trained with a held-out split "
                              f"written by this version; pass labelled photos with --data DIR instead")
    return load_splits(path, root=root, check_files=False)


def read_split_if_any(run):
    """`read_split(run)`, or None for a run without a readable split."""
    try:
        return read_split(run)
    except MineralNetError:
        return None


def split_photos(split, part: str) -> list[tuple[str, int]]:
    """The labelled (path, label) photos of one part ("train", "val") of a `read_split` dict that exist on this
    machine ([] when `split` is None)."""
    samples = (split["splits"].get(part) or []) if split else []
    return [(p, y) for p, y in samples if y >= 0 and os.path.isfile(p)]


def read_metrics(run) -> list[dict]:
    """metrics.jsonl of a run, one dict per finished epoch ([] when there is none yet)."""
    path = run_folder(run) / METRICS_FILE
    if not path.is_file():
        return []
    lines = [l for l in path.read_text(errors="replace").splitlines() if l.strip()]
    out = []
    for i, l in enumerate(lines):
        try:
            out.append(json.loads(l))
        except ValueError:
            if i == len(lines) - 1:  # torn by a kill during the append: that epoch is re-run on resume
                break
            raise MineralNetError(f"{str(path)!r} line {i + 1} is not JSON; the file is damaged: delete that line "
                                  f"(or the file) and resume") from None
    return out


def read_result(run) -> dict | None:
    path = run_folder(run) / RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None
