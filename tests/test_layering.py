"""The package layering of docs/architecture.md: a package imports only packages below it (anywhere in a
module, function-level imports included), and the GPU tools import no Ray, MLflow or webdataset."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "arflow_scale"
# Lowest first: a package may import itself and anything earlier in this list, nothing later.
LAYERS = ["schema", "model", "flow", "config", "cluster", "data", "tasks", "checkpoint", "tracking", "eval",
          "train", "scaling", "bench", "cli"]


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported arflow_scale module) of every import statement in a file, relative ones resolved."""
    module = ".".join(path.relative_to(REPO).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    return imports_in(path.read_text(), package)


def imports_in(source: str, package: str) -> list[tuple[int, str]]:
    """(line, arflow_scale module) of every import in `source`, a module of `package`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            names = [name]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(node.lineno, n) for n in names if n.startswith("arflow_scale.")]
    return found


def layer_of(module: str) -> str:
    return module.split(".")[1].removesuffix(".py")


def test_every_package_has_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    packages |= {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert packages == set(LAYERS)


def test_no_package_imports_one_above_it():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) == 1 and path.stem == "__init__":
            continue
        own = parts[0].removesuffix(".py")
        for line, name in project_imports(path):
            target = layer_of(name)
            if rank[target] > rank[own]:
                upward.append(f"{path.relative_to(REPO)}:{line} ({own}) imports {name} ({target})")
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_the_checker_sees_function_level_and_relative_imports():
    """The scan is not fooled by an import hidden inside a function or written relatively."""
    source = "def f():\n    from arflow_scale.train import driver\n    from ..eval import grids\n    import os\n"
    assert [name for _, name in imports_in(source, "arflow_scale.data")] == ["arflow_scale.train",
                                                                           "arflow_scale.eval"]


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'ray', 'mlflow', 'webdataset'}:
            raise ImportError(f'{name} is not on the GPU machine')
sys.meta_path.insert(0, Block())
"""


def python_output(code: str) -> list[str]:
    """The stdout lines of `code` run by a fresh interpreter in the repository (which must exit 0)."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.splitlines()


def test_gpu_tools_import_without_ray_mlflow_webdataset():
    """tools/gpu_check.py and tools/gpu_bench.py run on a GPU machine that has torch and DeepSpeed but not Ray,
    MLflow or webdataset: their imports and the modules they use load without them."""
    code = BLOCKER + (
        "sys.path.insert(0, 'tools'); import gpu_check, gpu_bench\n"
        "import arflow_scale.train.engine, arflow_scale.train.state, arflow_scale.train.ema\n"
        "import arflow_scale.bench.batches, arflow_scale.checkpoint, arflow_scale.tasks, arflow_scale.eval.grids\n"
        "print('ok')\n")
    assert python_output(code)[-1] == "ok"


def test_reading_a_config_imports_no_torch():
    """Every CLI command reads a config; the model package loads its torch modules on first use only."""
    code = ("import sys\nimport arflow_scale.cli, arflow_scale.config\n"
            "from arflow_scale.model import SIZES, forward_flops\n"
            "print('torch' in sys.modules)\n"
            "from arflow_scale.model import ARFlow, chunk_attention\n"
            "import arflow_scale.model as model\n"
            "print('torch' in sys.modules, callable(chunk_attention), ARFlow.__module__)\n"
            "try:\n    model.no_such_name\nexcept AttributeError as error:\n    print(error)\n")
    assert python_output(code) == ["False", "True True arflow_scale.model.arflow",
                                   "module 'arflow_scale.model' has no attribute 'no_such_name'"]


def test_workers_without_tracking_and_fid_tasks_import_no_mlflow():
    """MLflow loads only where something is logged: rank 0's active Tracker, the driver, the FID reduce. A rank's
    DeepSpeed import leaves it out too (its autotuner would load it), and MLflow still imports afterwards."""
    code = ("import sys\nimport arflow_scale.train.trainer, arflow_scale.eval.graph\n"
            "from arflow_scale.tracking import Tracker\nfrom arflow_scale.train.engine import import_deepspeed\n"
            "tracker = Tracker(None, None)\ntracker.log_metrics({'loss': 1.0}, step=1)\ntracker.close()\n"
            "print(tracker.last_step('loss'), 'mlflow' in sys.modules)\n"
            "deepspeed = import_deepspeed()\nprint(callable(deepspeed.initialize), 'mlflow' in sys.modules)\n"
            "import mlflow\nprint(callable(mlflow.log_metrics))\n")
    assert python_output(code)[-3:] == ["0 False", "True False", "True"]
