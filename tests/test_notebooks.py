"""The notebooks in notebooks/ run top to bottom in a Jupyter kernel, and are committed without outputs.

Each notebook is executed with nbclient in a fresh IPython kernel that runs on this interpreter
(``sys.executable``, i.e. the project's virtualenv) through a kernel spec written to a temporary
directory: nothing is installed into the user's Jupyter configuration, and a global "python3" kernel
that points at another Python cannot be picked up by mistake. The kernel's working directory is
notebooks/, as in Jupyter.

The default run sets ``RELP_NOTEBOOK_SMALL=1``: the notebooks then use a tiny random-weight model and
few prompts (seconds per notebook; this is what CI runs). ``pytest -m slow`` also runs the quickstart
on the real embedded model (minutes). Any cell error fails the test and names the cell.

Set ``RELP_NOTEBOOK_OUTPUT_DIR=dir`` to keep the executed notebooks and every figure they display as
PNG files there (``<notebook>-<cell>-<n>.png``), e.g. to look at the figures.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbclient  # the dev extras install nbclient, nbformat and ipykernel (pip install -e ".[dev]")
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = ("quickstart.ipynb", "own_model.ipynb", "embeddings.ipynb")
KERNEL_NAME = "relp-notebook-test"
CELL_TIMEOUT_S = {True: 600, False: 3600}  # per cell, small / full configuration (small: seconds in all)


def _kernel_manager(tmp_path: Path):
    """A kernel manager whose only kernel spec runs ipykernel on this interpreter."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    spec_dir = tmp_path / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"relp tests ({sys.executable})",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    return AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def execute_notebook(name: str, tmp_path: Path, *, small: bool) -> tuple[object, float]:
    """Run notebooks/<name> in a fresh kernel; returns (executed notebook, seconds)."""
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    env = dict(os.environ)
    env["RELP_NOTEBOOK_SMALL"] = "1" if small else "0"
    # The kernel runs in notebooks/, so without this it would import relp from wherever the interpreter
    # has it installed (an editable install may point at another checkout): test this checkout's relp.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["IPYTHONDIR"] = str(tmp_path / "ipython")  # keep the kernel's profile out of ~/.ipython
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path / "runtime")  # connection files
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # figures as PNG outputs, even if CI sets Agg
    client = nbclient.NotebookClient(
        nb,
        km=_kernel_manager(tmp_path),
        timeout=CELL_TIMEOUT_S[small],
        allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    started = time.perf_counter()
    client.execute(env=env)
    seconds = time.perf_counter() - started
    _keep_outputs(nb, name, small)
    return nb, seconds


def _keep_outputs(nb, name: str, small: bool) -> None:
    out = os.environ.get("RELP_NOTEBOOK_OUTPUT_DIR")
    if not out:
        return
    out = Path(out) / ("small" if small else "full")
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(name).stem
    nbformat.write(nb, out / name)
    for index, cell in enumerate(nb.cells):
        for n, output in enumerate(cell.get("outputs", [])):
            png = output.get("data", {}).get("image/png")
            if png:
                (out / f"{stem}-{index:02d}-{n}.png").write_bytes(base64.b64decode(png))


# Without ipywidgets, importing tqdm.auto in a kernel (transformers and huggingface_hub do) warns once
# and falls back to text progress bars: an environment matter, not a notebook problem.
_KNOWN_STDERR = re.compile(r"^.*TqdmWarning: IProgress not found.*\n(\s+from \.autonotebook import.*\n)?", re.M)


def _stderr_text(nb) -> str:
    text = "".join(
        o.text for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
        if o.output_type == "stream" and o.name == "stderr"
    )
    return _KNOWN_STDERR.sub("", text)


def _figures(nb) -> tuple[int, list[int]]:
    """(number of figures displayed as PNG, cells whose figure came out only as text "<Figure ...>")."""
    shown, text_only = 0, []
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" in data:
                shown += 1
            elif str(data.get("text/plain", "")).startswith("<Figure"):
                text_only.append(index)
    return shown, text_only


def _check_figures(nb, name: str) -> None:
    shown, text_only = _figures(nb)
    assert not text_only, f"{name}: cells {text_only} returned a figure that was not rendered"
    assert shown >= 2, f"{name} displayed {shown} figures; expected its plots as PNG images"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_without_outputs(name):
    """No stale outputs: committed notebooks are cleared (the CI run below produces fresh ones)."""
    path = NOTEBOOK_DIR / name
    assert path.is_file(), f"{path} is missing"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, f"{name} has no code cells"
    stale = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code" and (cell.outputs or cell.execution_count)]
    assert not stale, f"{name}: cells {stale} have outputs or execution counts; clear them before committing"
    assert "RELP_NOTEBOOK_SMALL" in code[0].source, f"{name}: the first code cell must read RELP_NOTEBOOK_SMALL"


def test_every_committed_notebook_is_tested():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(["git", "ls-files", "notebooks/*.ipynb"], cwd=ROOT, capture_output=True, text=True, check=True)
    committed = sorted(Path(line).name for line in listed.stdout.split())
    assert set(committed) <= set(NOTEBOOKS), f"notebooks without a test: {sorted(set(committed) - set(NOTEBOOKS))}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_small_configuration(name, tmp_path):
    nb, seconds = execute_notebook(name, tmp_path, small=True)
    print(f"{name}: executed in {seconds:.1f} s")
    _check_figures(nb, name)
    stderr = _stderr_text(nb)
    assert "Traceback" not in stderr and "Warning" not in stderr, f"{name} wrote to stderr:\n{stderr}"


@pytest.mark.slow
def test_quickstart_runs_on_the_embedded_model(tmp_path):
    nb, seconds = execute_notebook("quickstart.ipynb", tmp_path, small=False)
    print(f"quickstart.ipynb (embedded model): executed in {seconds:.1f} s")
    _check_figures(nb, "quickstart.ipynb")
    text = "".join(
        str(o.get("data", {}).get("text/plain", "")) + o.get("text", "")
        for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
    )
    assert "SmolLM2-135M-Instruct" in text
