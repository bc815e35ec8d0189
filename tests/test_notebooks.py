"""Both notebooks run top to bottom, unedited, against the real app on loopback (as in CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is first imported
pytestmark = pytest.mark.serve

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("mujoco")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def execute(name: str, env: dict[str, str], timeout_s: int = 300) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = nbclient.NotebookClient(notebook, timeout=timeout_s, kernel_name="python3",
                                         resources={"metadata": {"path": str(NOTEBOOKS)}})
        client.execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return notebook


def outputs(notebook) -> str:
    return "\n".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", []))


@pytest.fixture()
def app_env(serve_harness, demo_app) -> dict[str, str]:
    import ray

    return {"ROBOT_POLICY_ADDRESS": demo_app, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "MUJOCO_GL": "egl"}


def test_quickstart_notebook(app_env):
    text = outputs(execute("quickstart.ipynb", app_env))
    assert "chunk (16, 8)" in text and "round trip p50" in text and "targets, reached at" in text


def test_operations_notebook(app_env, serve_harness):
    try:
        text = outputs(execute("operations.ipynb", app_env))
    finally:
        serve_harness.forget()  # the notebook redeployed the app (and put its config back)
    assert "no replica restart" in text and "batch and latency metrics exported" in text


@pytest.mark.parametrize("name", ["quickstart.ipynb", "operations.ipynb"])
def test_notebooks_are_committed_with_their_outputs(name):
    """A reader browsing the repository sees what a run shows (scripts/run_notebooks.py refreshes them)."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    unrun = [i for i, cell in enumerate(code) if cell.get("execution_count") is None]
    assert code and not unrun, f"{name}: code cells {unrun} were never run; run scripts/run_notebooks.py"
    kinds = {key for cell in code for o in cell.outputs for key in o.get("data", {})} | {
        o.output_type for cell in code for o in cell.outputs}
    assert "stream" in kinds and "image/png" in kinds, f"{name}: no printed output or plot saved ({kinds})"
    errors = [o for cell in code for o in cell.outputs if o.output_type == "error"]
    assert not errors, f"{name}: committed with an error output: {errors[0].get('ename')}"
