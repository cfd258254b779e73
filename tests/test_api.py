"""The public API: what ``empssl`` exports, and the README's Python example, run as written."""

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import empssl

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_exported_name_resolves_to_its_module():
    assert set(empssl.__all__) == {"__version__", *empssl._API}
    for name in empssl.__all__:
        value = getattr(empssl, name)
        if name != "__version__":
            assert value.__name__ == name and value.__module__.startswith("empssl.")
    # train, evaluate and embed are also module names: the function wins, whatever was imported first
    importlib.import_module("empssl.cli")
    importlib.import_module("empssl.compare")  # imports empssl.train the module
    from empssl import train

    assert train is empssl.train is sys.modules["empssl.train"].train and callable(empssl.evaluate)


def run_readme_example(heading: str, tmp_path: Path) -> str:
    """Run the first python block under ``heading`` of README.md as written; its stdout."""
    text = README.read_text()
    section = text[text.index(f"\n{heading}\n"):]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, f"README's {heading} section has no python block"
    (tmp_path / "example.py").write_text(code.group(1))
    # a fresh process in an empty folder: the example's data cache goes there, and nothing is imported before it
    src = str(Path(empssl.__file__).resolve().parents[1])  # this checkout's empssl, whatever the cwd
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_the_readme_python_example_runs(tmp_path):
    stdout = run_readme_example("## Python", tmp_path)
    accuracy = re.fullmatch(r"random init: kNN (\d+)%, linear (\d+)%\n", stdout)
    assert accuracy is not None, stdout
    # an untrained encoder on 10 classes: above nothing, not above perfect (chance is 10 %)
    assert 0 < int(accuracy.group(1)) < 100 and 0 < int(accuracy.group(2)) < 100


def test_no_import_cycle_counting_deferred_and_type_only_imports(tmp_path):
    """tools/import_graph.py counts the imports inside functions and under ``if TYPE_CHECKING:`` (a type is a
    dependency too), and the package has no cycle among them."""
    import runpy

    tool = runpy.run_path(str(README.parent / "tools" / "import_graph.py"))
    toy = tmp_path / "toy"
    toy.mkdir()
    (toy / "__init__.py").write_text("")
    (toy / "a.py").write_text("from . import b\n")
    (toy / "b.py").write_text("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from .c import C\n")
    (toy / "c.py").write_text("def f():\n    from .a import A\n")
    assert tool["imports"](toy)["b"] == {"c": False}
    assert tool["cycles"](tool["imports"](toy)) == [["a", "b", "c"]]
    assert tool["cycles"](tool["imports"](Path(empssl.__file__).parent)) == []


def test_the_docs_name_no_folder_of_the_machine_they_were_written_on():
    root = README.parent
    docs = [README, *sorted((root / "docs").glob("*.md")), *sorted((root / "src" / "empssl").rglob("*.md"))]
    for path in docs:
        found = re.findall(r"(?<![\w.~])/(?:tmp|work|root|home)/[^\s`'\")]*", path.read_text())
        assert not found, (path.relative_to(root), found)


def test_the_readme_own_loop_example_runs(tmp_path):
    stdout = run_readme_example("### EMP-SSL in your own training loop", tmp_path)
    steps = re.findall(r"loss (\S+): TCR (\S+), invariance (\S+)\n", stdout)
    assert len(steps) == 4, stdout  # 64 images in batches of 16
    for loss, tcr, invariance in (map(float, step) for step in steps):
        assert tcr > 0 and -1 <= invariance <= 1 and abs(loss - (-tcr - 200 * invariance)) < 0.02


def test_the_readme_own_batches_example_runs(tmp_path):
    stdout = run_readme_example("### Training on your own batches", tmp_path)
    assert stdout.endswith("4 steps on 64 images\n"), stdout
    assert (tmp_path / "runs" / "mine" / "checkpoint.pt").is_file()
