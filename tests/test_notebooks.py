"""The notebooks execute headless on tiny runs and draw their figures, are stored without outputs, and the
installed environment can open them (``jupyter lab``)."""

from __future__ import annotations

import ast
import base64
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from PIL import Image

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
FIGURES = {"01_action_distributions": 4, "02_compare_runs": 2}  # figures each notebook draws when run headless


def test_every_notebook_declares_its_figures_and_is_valid_python3():
    assert NOTEBOOKS, "no notebooks under notebooks/"
    assert {p.stem for p in NOTEBOOKS} == set(FIGURES), "each notebook under notebooks/ needs its figure count"
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        assert notebook.metadata.get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernel"
        for cell in notebook.cells:
            if cell.cell_type == "code":
                ast.parse(cell.source, filename=path.name)  # a syntax error fails here, before the slow run


def test_the_environment_provides_jupyter_lab_and_nbconvert():
    jupyter = shutil.which("jupyter", path=str(Path(sys.executable).parent)) or shutil.which("jupyter")
    assert jupyter, "no `jupyter` command: pip install -e '.[dev,dmc]' brings JupyterLab (jupyter lab notebooks/)"
    for command in ("lab", "nbconvert"):
        done = subprocess.run([jupyter, command, "--version"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"jupyter {command} --version: {done.stderr[-2000:]}"
        assert re.fullmatch(r"\d+\.\d+\.\d+\S*", done.stdout.strip()), done.stdout


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: outputs not stripped"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_and_draws(path, tmp_path, monkeypatch):
    monkeypatch.setenv("DIME_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == FIGURES[path.stem], f"{path.name}: {len(images)} figures, expected {FIGURES[path.stem]}"
    for image in images:
        picture = Image.open(io.BytesIO(base64.b64decode(image["data"]["image/png"]))).convert("L")
        low, high = picture.getextrema()
        assert min(picture.size) >= 100 and high - low > 50, f"{path.name}: a blank or tiny figure {picture.size}"
