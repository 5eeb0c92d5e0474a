"""The architecture rules of DESIGN.md section 3, checked on the source tree: the library never imports
its CLI, no module imports from a higher layer, no two modules import each other, presets ship as package data, one split-file format."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "mineralnet"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every mineralnet module `path` imports, at any depth of the file (function-level imports too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from mineralnet import data`
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    files = sorted(PKG.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    return {_module_name(f): _imports(f, modules) for f in files}


def test_the_library_never_imports_its_cli():
    graph = _graph()
    offenders = sorted(m for m, deps in graph.items() if "mineralnet.cli" in deps and m != "mineralnet.cli")
    assert not offenders, f"these modules import mineralnet.cli: {offenders}"


def test_no_two_modules_import_each_other():
    graph = _graph()
    # a package's __init__ re-exporting its own submodules is not a cycle with them
    def own(a, b):
        return b.startswith(a + ".") or a.startswith(b + ".")
    pairs = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps
                    if a in graph.get(b, ()) and not own(a, b)})
    assert not pairs, f"modules that import each other: {pairs}"


def test_import_graph_check_catches_a_cycle(tmp_path, monkeypatch):
    # the check itself must be able to fail: two modules importing each other are found
    pkg = tmp_path / "mineralnet"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from mineralnet import b\n")
    (pkg / "b.py").write_text("from mineralnet.a import f\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    graph = _graph()
    assert "mineralnet.b" in graph["mineralnet.a"] and "mineralnet.a" in graph["mineralnet.b"]


# The layers of docs/ARCHITECTURE.md, lowest first. A module may import from its own layer or below, never above
# (imports inside functions count). The longest matching prefix decides; a package's `cli`/`command`/`ui`
# module is the command layer.
LAYERS = {
    "mineralnet.files": 0, "mineralnet.errors": 0,
    "mineralnet": 1,  # config, data, model, metrics, runs, losses, ...: the foundations
    "mineralnet.calibration.core": 1, "mineralnet.calibration.store": 1, "mineralnet.calibration.graph": 1,
    "mineralnet.infer": 2,
    "mineralnet.train": 3, "mineralnet.calibration": 3, "mineralnet.export": 3, "mineralnet.quantize": 3,
    "mineralnet.analysis.evaluate": 4, "mineralnet.analysis.crossval": 4, "mineralnet.analysis.cvfolds": 4, "mineralnet.analysis.explain": 4,
    "mineralnet.analysis": 4, "mineralnet.bench": 4, "mineralnet.app": 4, "mineralnet.ensemble": 4,
    "mineralnet.cli": 5,
}
COMMAND_MODULES = ("cli",)


def _layer(module: str) -> int:
    if module.rpartition(".")[2] in COMMAND_MODULES:
        return LAYERS["mineralnet.cli"]
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def _upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                  if not m.startswith(d + ".") and _layer(d) > _layer(m))  # a package's own __init__ aside


def test_no_module_imports_from_a_higher_layer():
    up = _upward_imports(_graph())
    assert not up, f"imports from a higher layer (see docs/ARCHITECTURE.md): {up}"


def test_layer_check_catches_an_upward_import(tmp_path, monkeypatch):
    # the check itself must be able to fail: export importing a command inside a function, infer importing train
    pkg = tmp_path / "mineralnet"
    for sub in ("infer", "export", "train"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "infer" / "loop.py").write_text("from mineralnet.train import fit\n")
    (pkg / "export" / "gates.py").write_text("def f():\n    from mineralnet.infer import cli\n")
    (pkg / "infer" / "cli.py").write_text("from mineralnet.export import gates\n")
    (pkg / "train" / "fit.py").write_text("from mineralnet.infer import loop\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    assert _upward_imports(_graph()) == ["mineralnet.export.gates -> mineralnet.infer.cli",
                                         "mineralnet.infer.loop -> mineralnet.train",
                                         "mineralnet.infer.loop -> mineralnet.train.fit"]


def test_config_imports_nothing_from_data():
    graph = _graph()
    assert not {d for d in graph["mineralnet.config"] if d.startswith("mineralnet.data")}, graph["mineralnet.config"]


# Names equal to a run-folder name that are not about a run folder: (file under mineralnet/, name) -> why.
NOT_RUN_FILES = {("data/shards.py", "split.json"): "the shard folder's own split file (same format, another folder)",
                 ("weights/__init__.py", "model.safetensors"): "a file name on the Hugging Face hub"}


def _run_file_literals(pkg: Path, names) -> list[str]:
    """String constants under `pkg` that spell a run-folder name, outside runs.py and artifact.py (the owners).
    Names with a dot count anywhere; bare folder names ("eval", "state", "export", "tb") count where they build
    a path (an operand of `/`, or an argument of Path/joinpath/os.path.join/with_name), since "eval" and "export"
    are also command names."""
    found = []
    for f in sorted(pkg.rglob("*.py")):
        rel = f.relative_to(pkg).as_posix()
        if rel in ("runs.py", "artifact.py"):
            continue
        tree = ast.parse(f.read_text())
        parent = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names):
                continue
            if (rel, node.value) in NOT_RUN_FILES:
                continue
            up = parent.get(node)
            call = getattr(getattr(up, "func", None), "attr", None) or getattr(getattr(up, "func", None), "id", None)
            in_path = (isinstance(up, ast.BinOp) and isinstance(up.op, ast.Div)) or \
                (isinstance(up, ast.Call) and call in ("Path", "joinpath", "join", "with_name"))
            if "." in node.value or in_path:
                found.append(f"{rel}:{node.lineno}: {node.value!r}")
    return found


def test_no_run_file_name_outside_runs_and_artifact():
    from mineralnet.runs import FILE_NAMES

    assert {"eval", "split.json", "state", "model.safetensors", "config.yaml", "export"} <= set(FILE_NAMES)
    found = _run_file_literals(PKG, set(FILE_NAMES))
    assert not found, f"run-folder names spelled outside runs.py/artifact.py (use RunDir or its constants): {found}"


def test_run_file_check_catches_a_literal(tmp_path):
    # the check itself must be able to fail: a path built from "eval" and a "split.json" anywhere are found, the
    # command name "eval", the owners and the listed exceptions are not
    (tmp_path / "data").mkdir()
    (tmp_path / "runs.py").write_text('SPLIT = "split.json"\n')
    (tmp_path / "evaluate.py").write_text('def f(run):\n    return run / "eval" / "metrics.json"\n')
    (tmp_path / "cli.py").write_text('COMMANDS = {"eval": 1}\nHELP = "reads split.json"\n')
    (tmp_path / "fold.py").write_text('from pathlib import Path\nP = Path("state")\nF = "split.json"\n')
    (tmp_path / "data" / "shards.py").write_text('SPLIT_FILE = "split.json"\n')
    names = {"eval", "state", "split.json", "metrics.json"}
    assert sorted(_run_file_literals(tmp_path, names)) == ["evaluate.py:2: 'eval'", "evaluate.py:2: 'metrics.json'",
                                                   "fold.py:2: 'state'", "fold.py:3: 'split.json'"]


def _preset_copies(repo: Path) -> list[str]:
    """YAML files outside mineralnet/presets/ that hold the same text as a packaged preset."""
    packaged = {p.read_text() for p in (repo / "mineralnet" / "presets").glob("*.yaml")}
    skip = {".git", ".venv", "node_modules", "build", "dist"}  # build/: a wheel build's own copy
    return sorted(str(p.relative_to(repo)) for p in repo.rglob("*.yaml")
                  if not skip & set(p.relative_to(repo).parts) and p.parent != repo / "mineralnet" / "presets"
                  and p.read_text() in packaged)


def test_presets_have_one_home():
    assert {p.stem for p in (PKG / "presets").glob("*.yaml")} >= {"base", "cpu", "cpu-pretrained", "demo", "paper"}
    copies = _preset_copies(REPO)
    assert not copies, f"copies of mineralnet/presets/ files (point at the package presets instead): {copies}"


def test_preset_copy_check_catches_a_copy(tmp_path):
    # the check itself must be able to fail: a byte-identical copy under launch/ is found
    (tmp_path / "mineralnet" / "presets").mkdir(parents=True)
    (tmp_path / "mineralnet" / "presets" / "cpu.yaml").write_text("epochs: 3\n")
    (tmp_path / "launch" / "configs").mkdir(parents=True)
    (tmp_path / "launch" / "configs" / "cpu.yaml").write_text("epochs: 3\n")
    (tmp_path / "launch" / "configs" / "mine.yaml").write_text("epochs: 4\n")
    assert _preset_copies(tmp_path) == [str(Path("launch/configs/cpu.yaml"))]


def test_readme_names_only_packaged_presets():
    import re

    names = set(re.findall(r"--config[ =]([a-z][a-z0-9-]*)\b", (REPO / "README.md").read_text()))
    packaged = {p.stem for p in (PKG / "presets").glob("*.yaml")}
    assert names and names <= packaged, f"README names presets that mineralnet/presets/ lacks: {names - packaged}"



def _script_clashes(repo: Path) -> list[str]:
    """bench/ and studies/ scripts named like a mineralnet module or package (`python bench/x.py` puts bench/
    first on sys.path, and a reader looking for `inference` should find one file)."""
    lib = {p.stem for p in (repo / "mineralnet").rglob("*.py") if p.stem != "__init__"}
    lib |= {p.name for p in (repo / "mineralnet").rglob("*") if p.is_dir() and p.name != "__pycache__"}
    return sorted(str(p.relative_to(repo)) for folder in ("bench", "studies")
                  for p in (repo / folder).glob("*.py") if p.stem in lib)


def test_bench_and_study_scripts_are_not_named_like_library_modules():
    assert (REPO / "studies" / "README.md").is_file()
    clashes = _script_clashes(REPO)
    assert not clashes, f"scripts named like a mineralnet module (rename the script): {clashes}"


def test_script_name_check_catches_a_clash(tmp_path):
    # the check itself must be able to fail: bench/inference.py beside mineralnet/bench/inference.py, studies/data.py
    # beside the mineralnet/data/ package
    (tmp_path / "mineralnet" / "bench").mkdir(parents=True)
    (tmp_path / "mineralnet" / "data").mkdir()
    (tmp_path / "mineralnet" / "bench" / "inference.py").write_text("")
    (tmp_path / "bench").mkdir()
    (tmp_path / "studies").mkdir()
    for name in ("bench/inference.py", "bench/inference_runtimes.py", "studies/data.py"):
        (tmp_path / name).write_text("")
    assert _script_clashes(tmp_path) == [str(Path("bench/inference.py")), str(Path("studies/data.py"))]

@pytest.mark.slow
def test_wheel_ships_the_presets_and_train_help_works_installed(tmp_path):
    import zipfile

    from setuptools import build_meta

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        wheel = build_meta.build_wheel(str(tmp_path))
    finally:
        os.chdir(cwd)
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    presets = {Path(n).name for n in names if n.startswith("mineralnet/presets/")}
    assert {"cpu.yaml", "paper.yaml", "demo.yaml"} <= presets
    # a non-editable install: the wheel's files first on the path, run from outside the source tree
    site = tmp_path / "site"
    zipfile.ZipFile(tmp_path / wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = ("import sys, mineralnet; assert mineralnet.__file__.startswith(sys.argv[1]), mineralnet.__file__; "
            "from mineralnet.cli import main; sys.exit(main(['train', '--config', 'cpu', '--help']))")
    p = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "--backbone" in p.stdout


# ----------------------------------------------------------------------------- sizes and the one prediction loop
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 80


def _oversized(pkg: Path) -> list[str]:
    found = []
    for path in sorted(pkg.rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(pkg.parent).as_posix()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            found.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{rel}:{node.lineno} {node.name}(): {length} lines")
    return found


def test_no_module_over_500_lines_and_no_function_over_80():
    found = _oversized(PKG)
    assert not found, f"split these (at most {MAX_MODULE_LINES} lines a module, {MAX_FUNCTION_LINES} a function): {found}"


def test_size_check_catches_a_long_module_and_function(tmp_path):
    pkg = tmp_path / "mineralnet"
    pkg.mkdir()
    (pkg / "short.py").write_text("def f():\n    return 1\n")
    (pkg / "long_function.py").write_text("def f():\n" + "    x = 1\n" * 80 + "\n\ndef g():\n    return 2\n")
    (pkg / "long_module.py").write_text("x = 1\n" * 501)
    assert _oversized(pkg) == ["mineralnet/long_function.py:1 f(): 81 lines", "mineralnet/long_module.py: 501 lines"]


# Model forwards without gradients in a loop over batches are predictions: they live in infer/loop.py
# (predict_loader over a DataLoader, predict_array over a preprocessed array). Listed here: loops that are not.
NOT_PREDICTION_LOOPS = {
    ("weights/__init__.py", "bn_statistics"): "forward hooks collect BatchNorm inputs; no answers",
    ("export/executorch.py", "to_pte"): "PT2E observers record int8 ranges while the quantization photos pass",
    ("train/state.py", "update"): "the weight EMA loops over tensors, not over photos",
}
NO_GRAD = ("no_grad", "inference_mode")


def _no_grad(node) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr in NO_GRAD or isinstance(n, ast.Name) and n.id in NO_GRAD
               for n in ast.walk(node))


def _prediction_loops(pkg: Path) -> list[str]:
    """Functions outside infer/loop.py that loop (`for`) inside a no-grad/inference-mode block or function."""
    found = []
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg).as_posix()
        if rel == "infer/loop.py":
            continue
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or (rel, fn.name) in NOT_PREDICTION_LOOPS:
                continue
            scopes = [fn] if any(_no_grad(d) for d in fn.decorator_list) else \
                [w for w in ast.walk(fn) if isinstance(w, ast.With) and any(_no_grad(i.context_expr) for i in w.items)]
            if any(isinstance(n, ast.For) for scope in scopes for n in ast.walk(scope)):
                found.append(f"{rel}:{fn.lineno} {fn.name}()")
    return sorted(set(found))


def test_one_prediction_loop():
    found = _prediction_loops(PKG)
    assert not found, f"prediction loops outside mineralnet/infer/loop.py (use predict_loader/predict_array): {found}"


def test_prediction_loop_check_catches_a_second_loop(tmp_path):
    (tmp_path / "infer").mkdir()
    (tmp_path / "infer" / "loop.py").write_text("@torch.no_grad()\ndef predict_loader(m, xs):\n    for x in xs:\n        m(x)\n")
    (tmp_path / "mine.py").write_text("def score(m, xs):\n    with torch.inference_mode():\n        for x in xs:\n"
                                      "            m(x)\n\n\ndef train(m, xs):\n    for x in xs:\n        m(x)\n")
    assert _prediction_loops(tmp_path) == ["mine.py:1 score()"]
