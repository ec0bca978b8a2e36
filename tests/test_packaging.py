"""Packaging: where the `swarm.*` packages come from, what the wheel holds, generated code in sync."""

from __future__ import annotations

import configparser
import importlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# What a wheel is built from; copied so the build never writes build/ or *.egg-info into the repo.
_BUILD_INPUTS = ("pyproject.toml", "README.md", "swarm", "kernels", "peers")


@pytest.mark.parametrize(
    ("module", "folder"),
    [("swarm", "swarm"), ("swarm.kernels", "kernels"), ("swarm.peers", "peers")],
)
def test_swarm_packages_come_from_repo_folders(module: str, folder: str) -> None:
    # kernels/ and peers/ sit at the top of the repo but must import as swarm.kernels / swarm.peers.
    mod = importlib.import_module(module)
    assert mod.__file__ is not None, f"{module} has no __init__.py"
    assert Path(mod.__file__).resolve().parent == REPO / folder


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_installs_everything_under_swarm(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in _BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    dist = tmp_path / "dist"
    # No build isolation and no deps: uses the setuptools already installed, needs no network.
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
        check=False,
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = dist.glob("swarm_train-*.whl")

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points_text = zf.read(entry_points).decode()

    for expected in (
        "swarm/__init__.py",
        "swarm/kernels/__init__.py",
        "swarm/peers/__init__.py",
        "swarm/proto/v1/coordinator_pb2.py",
        "swarm/proto/v1/coordinator_pb2.pyi",
        "swarm/proto/v1/coordinator_pb2_grpc.py",
    ):
        assert expected in names, f"{expected} missing from {wheel.name}"
    # A top-level `kernels` would shadow the Hugging Face package of that name.
    leaked = sorted(n for n in names if n.split("/", 1)[0] in ("kernels", "peers"))
    assert not leaked, f"top-level entries in {wheel.name}: {leaked}"

    parser = configparser.ConfigParser()
    parser.read_string(entry_points_text)
    assert parser["console_scripts"]["swarm"] == "swarm.cli.main:main"


def test_generated_protocol_code_has_not_drifted() -> None:
    # The CI drift check: committed swarm/proto/ must equal a fresh protoc run over protos/.
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_protos.py"), "--check"],
        check=False,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_readme_layout_names_only_parts_of_swarm_that_exist() -> None:
    # The Layout block lists the library's parts after "swarm/ ... the library:"; each must be a
    # module or package under swarm/ (it listed a `security` module that did not exist).
    text = (REPO / "README.md").read_text()
    block = text[text.index("## Layout"):]
    listed = block[block.index("the library:") + len("the library:"):block.index("swarm/proto/")]
    names = [n.strip() for n in listed.replace("\n", " ").split(",") if n.strip()]
    assert len(names) >= 5, names
    missing = [n for n in names if not (REPO / "swarm" / n).is_dir() and not (REPO / "swarm" / f"{n}.py").is_file()]
    assert not missing, f"README's Layout names parts that do not exist: {missing}"


def test_the_readme_hooks_example_needs_only_the_swarm_package() -> None:
    # The one-line change to a user's loop must not reach into the daemon or internal configs.
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Training in your own loop"):]
    code = section[section.index("```python") + len("```python"):]
    code = code[:code.index("```")]
    imports = [line.strip() for line in code.splitlines() if line.strip().startswith(("import ", "from "))]
    assert imports == ["import swarm"], imports
    assert "swarm.SwarmPeer(coordinator=" in code
