"""OpenTau 0.14.0's own environment, for the scripts that compare with it (never a dependency, absent in CI).

Made with uv (docs/pi05.md, "Parity"); `OPENTAU_VENV` points at another one.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

DEFAULT_VENV = Path(os.environ.get("OPENTAU_VENV", "/work/opentau-venv"))


def opentau_python(venv: Path) -> Path | None:
    """The venv's python if it imports opentau and sentencepiece, else None."""
    python = venv / "bin" / "python"
    if not python.is_file():
        return None
    probe = subprocess.run([str(python), "-c", "import opentau, sentencepiece"], capture_output=True, check=False)
    return python if probe.returncode == 0 else None
