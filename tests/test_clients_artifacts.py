"""Both clients build into installable artifacts: a wheel and an sdist (`python -m build`) for
clients/python, a tarball (`npm pack`) for clients/js; each is installed and imported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from support import ROOT


def test_python_client_builds_and_installs(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--no-isolation",
            "--outdir",
            str(out),
            str(ROOT / "clients" / "python"),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    wheel = next(out.glob("fluxbase_client-*.whl"))
    sdist = next(out.glob("fluxbase_client-*.tar.gz"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "fluxbase_client/realtime.py" in names and "fluxbase_client/webhooks.py" in names
    assert not [n for n in names if n.startswith(("tests/", "fluxbase/"))]
    assert any(n.endswith("/README.md") for n in tarfile.open(sdist).getnames())
    # Installed from the wheel into its own folder, which comes first on the path (its
    # dependencies, httpx and websockets, come from this environment).
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        timeout=120,
    )
    code = "import fluxbase_client; print(fluxbase_client.__file__); print(fluxbase_client.__version__)"
    shown = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": os.environ.get("PATH", "")},
    ).stdout
    assert str(site) in shown and "0.1.0" in shown


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
def test_js_client_packs_without_dependencies(tmp_path: Path) -> None:
    js = ROOT / "clients" / "js"
    pkg = json.loads((js / "package.json").read_text())
    assert not pkg.get("dependencies") and pkg["type"] == "module" and pkg["types"]
    res = subprocess.run(
        ["npm", "pack", "--json", "--pack-destination", str(tmp_path)],
        cwd=js,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    info = json.loads(res.stdout)[0]
    files = {f["path"] for f in info["files"]}
    assert {"package.json", "README.md", "src/index.js", "src/index.d.ts"} <= files
    assert not [f for f in files if f.startswith(("test/", "tools/"))]
    tarball = tmp_path / info["filename"]
    # Installed from the tarball into an empty project (offline: nothing to fetch) and imported.
    app = tmp_path / "app"
    app.mkdir()
    (app / "package.json").write_text('{"name": "app", "version": "1.0.0", "type": "module"}')
    subprocess.run(
        ["npm", "install", "--offline", "--no-audit", "--no-fund", str(tarball)],
        cwd=app,
        check=True,
        capture_output=True,
        timeout=120,
    )
    check = "import('@fluxbase/client').then(m => console.log(typeof m.createClient, typeof m.verifyWebhook))"
    out = subprocess.run(["node", "-e", check], cwd=app, check=True, capture_output=True, text=True).stdout
    assert out.split() == ["function", "function"]
