"""Execute notebooks/*.ipynb top to bottom and save them with their outputs (what the repository shows).

    .venv/bin/serve run serve_config.yaml &     # the app the notebooks talk to (else they start one)
    MUJOCO_GL=egl .venv/bin/python scripts/run_notebooks.py

CI executes the same notebooks from scratch (tests/test_notebooks.py); this
only refreshes what a reader browsing the repository sees.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbclient
import nbformat

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def main(names: list[str]) -> None:
    for path in [NOTEBOOKS / n for n in names] or sorted(NOTEBOOKS.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
        nbformat.write(notebook, path)
        print(f"{path.name}: executed, outputs saved")


if __name__ == "__main__":
    main(sys.argv[1:])
