"""The package's three floors (docs/how-it-works.md) on their ground: files.py, the one checked
way to read and write files, imports nothing of the package and every module may import it;
foundations import nothing else of the package, services import only foundations, commands tie
them together without importing one another (cli.py, the commands' shared convention, aside),
and train.py's parts (the training package) serve train.py alone. A package (config, training)
is one module here: its files may import one another. Read from the source, so a new module
must be placed on a floor here before it can land."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dist_resnet"
GROUND = {"files"}
FOUNDATIONS = {"config", "model", "data", "transforms", "batches", "images", "metrics", "distributed", "plots",
               "provenance", "ema", "best", "profiling"}
SERVICES = {"recipe", "checkpoint", "rundir", "tracking", "report", "datasets", "compile_cache"}
COMMANDS = {"cli", "runs", "train", "evaluate", "predict", "bench", "export", "summarize"}
SHARED = {"cli", "runs"}  # what the commands share
TRAINING = {"training"}  # train.py's parts


def imports_of(module: str) -> set[str]:
    """The package modules `module` imports, at any depth of its code (of all its files, for a
    package)."""
    path = PACKAGE / module
    sources = sorted(path.glob("*.py")) if path.is_dir() else [PACKAGE / f"{module}.py"]
    found = set()
    for node in (n for source in sources for n in ast.walk(ast.parse(source.read_text()))):
        if isinstance(node, ast.ImportFrom) and node.module == "dist_resnet":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dist_resnet."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("dist_resnet.")}
    return found - {module}


def test_every_module_is_on_a_floor():
    modules = ({p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
               | {p.parent.name for p in PACKAGE.glob("*/__init__.py")})
    assert modules == GROUND | FOUNDATIONS | SERVICES | COMMANDS | TRAINING, "place the new module on a floor in this test"


def test_imports_never_run_up_or_sideways():
    for module in GROUND:
        assert not imports_of(module), f"{module} is the ground: it imports nothing of the package"
    for module in FOUNDATIONS:
        assert imports_of(module) <= GROUND, f"{module} is a foundation: it imports nothing of the package but files"
    for module in SERVICES:
        assert imports_of(module) <= GROUND | FOUNDATIONS, f"{module} is a service: it imports only foundations"
    for module in COMMANDS - SHARED:
        assert not imports_of(module) & (COMMANDS - SHARED), f"{module} imports another command"
        assert module == "train" or not imports_of(module) & TRAINING, f"{module} imports train.py's parts"
    for module in TRAINING:
        assert not imports_of(module) & (COMMANDS - SHARED), f"{module} imports a command"
