"""The repository's promises: CI runs the README's commands; the package imports cleanly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", setup, re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_commands_verbatim():
    commands = _readme_commands()
    assert any("pip install" in c for c in commands) and any("pytest" in c for c in commands)
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    missing = [c for c in commands if c not in ci]
    assert not missing, f".ci/run lacks README commands: {missing}"


def test_import_has_no_side_effects_and_kernels_live_under_fastpeft(tmp_path):
    # from another directory: no top-level `kernels` module, no output, no CUDA initialisation
    code = (
        "import sys, torch, fastpeft, fastpeft.kernels.reference;"
        "assert 'kernels' not in sys.modules, 'top-level kernels module imported';"
        "assert not torch.cuda.is_initialized();"
        "print(fastpeft.kernels.reference.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "fastpeft.kernels.reference"
    assert out.stderr == ""


def test_top_level_kernels_folder_never_shadows_hugging_faces_kernels():
    # From the repository root the current directory leads sys.path, as under `python -m pytest`; transformers
    # imports Hugging Face's `kernels` there, which our top-level kernels/ folder must not stand in for.
    code = (
        "import importlib.util, transformers.integrations.hub_kernels, kernels;"
        "print(kernels.__file__);"
        "print(importlib.util.find_spec('kernels').origin)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    for line in out.stdout.split():
        path = Path(line).resolve()
        assert ROOT / "kernels" not in path.parents, f"`import kernels` from the repository root found {path}"
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/ must stay a folder without __init__.py"
    # and the project's own package still finds its modules there
    code = "import fastpeft.kernels.nf4 as m; print(m.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).resolve() == ROOT / "kernels" / "nf4.py"


def test_an_older_triton_than_the_floor_fails_at_import_with_one_line(tmp_path):
    # a distribution record of Triton 3.5.1 ahead of the real one on the path: what pip leaves for that release
    record = tmp_path / "triton-3.5.1.dist-info"
    record.mkdir()
    (record / "METADATA").write_text("Metadata-Version: 2.1\nName: triton\nVersion: 3.5.1\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    run = [sys.executable, "-c", "import fastpeft"]
    out = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode != 0 and out.stdout == ""
    last = out.stderr.strip().splitlines()[-1]
    assert last == (
        "ImportError: fastpeft needs Triton >= 3.6 (PyTorch >= 2.10 brings it); Triton 3.5.1 is installed"
    ), out.stderr[-2000:]


def test_the_triton_floor_is_the_one_pyproject_declares_and_ci_tests():
    import fastpeft

    floor = ".".join(map(str, fastpeft._TRITON_MIN))
    declared = re.findall(r'"triton>=([0-9.]+);', (ROOT / "pyproject.toml").read_text())
    assert declared == [floor], declared
    assert "bash .ci/oldest_triton.sh" in (ROOT / ".ci" / "run").read_text()


def _fastpeft_imports(path: Path) -> set[str]:
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n == "fastpeft" or n.startswith(("fastpeft.", "kernels"))}


def test_the_library_never_imports_the_application():
    # two floors: kernels/ and fastpeft/{quant,loading,ops,nn,peft,...}; the application is fastpeft/app/
    library = [p for p in [*(ROOT / "fastpeft").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]
               if "app" not in p.relative_to(ROOT).parts and p.name not in ("cli.py", "__main__.py")]
    assert len(library) > 40
    upward = {str(p.relative_to(ROOT)): sorted(n for n in _fastpeft_imports(p) if n.startswith("fastpeft.app"))
              for p in library}
    upward = {k: v for k, v in upward.items() if v}
    assert not upward, f"library modules importing the application: {upward}"
    app = sorted(p.stem for p in (ROOT / "fastpeft" / "app").glob("*.py") if p.stem != "__init__")
    assert {"cli", "train", "data", "checkpoint", "distributed", "memory", "savers"} <= set(app)
    top = sorted(p.name for p in (ROOT / "fastpeft").glob("*.py"))
    assert not {"train.py", "data.py", "checkpoint.py", "run_control.py", "memory.py"} & set(top), top


def test_the_command_entry_points_reach_the_application():
    for argv in (["-m", "fastpeft", "--help"], ["-m", "fastpeft.cli", "--help"]):
        out = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "finetune" in out.stdout, (argv, out.stderr[-2000:])
