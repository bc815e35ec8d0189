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
