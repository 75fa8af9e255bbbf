"""The API extra alone (what Dockerfile.api installs) serves the API without any ML library."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from shared.settings import PROJECT_ROOT

CHECK = """
import sys
from fastapi.testclient import TestClient
from api.main import app
with TestClient(app) as client:
    ready = client.get("/readyz").json()
heavy = [m for m in ("torch", "transformers", "datasets", "peft", "bitsandbytes")
         if m in sys.modules]
print(ready["status"], heavy)
"""


def test_api_extra_installs_and_serves_without_torch(tmp_path: Path) -> None:
    venv = tmp_path / "api-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # A regular (non-editable) install, as in the image: migrations must ship as package data.
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"{PROJECT_ROOT}[api]"],
                   check=True, capture_output=True, cwd=tmp_path)
    listed = subprocess.run([str(python), "-m", "pip", "list"], check=True,
                            capture_output=True, text=True).stdout.lower()
    assert "torch" not in listed and "transformers" not in listed
    env = {"TUNERY_DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([str(python), "-c", CHECK], check=True, capture_output=True,
                         text=True, cwd=tmp_path, env=env)
    assert out.stdout.strip().splitlines()[-1] == "ready []"
