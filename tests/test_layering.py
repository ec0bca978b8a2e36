"""The layering of DESIGN.md holds: each part imports only parts below it, the library never imports the
daemon (peers/) or the scripts, and a concept fits one file of about 500 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# DESIGN.md: transport < compression (+ kernels) < allreduce < coordinator client < peer < diloco <
# {train, pipeline} < cli. Leaf helpers (generated protocol code, utils, metrics, the built-in task's
# model and data) import no other part, so anything may use them. The kernels plug into compression
# (they register themselves; compression finds them by name at first use), so they sit just above
# it. The daemon (peers/: the train task, the test tasks, `swarm peer`) sits on top with the CLI.
RANK = {
    "proto": 0, "utils": 0, "metrics": 0, "config": 0,
    "task": 0.5,  # the built-in model and data, and Hugging Face models (which need utils' import fix)
    "checkpoint": 0,  # the checkpoint file format (safetensors + manifest): what to save is each layer's own
    "security": 0,  # the run CA, certificates and TLS settings: both planes (transport, coordinator) use it
    "transport": 1,
    "compression": 2,
    "kernels": 3,
    "allreduce": 4,
    "coordinator": 5,
    "peer": 6,
    "diloco": 7,
    "training": 7.5,  # the settings train and pipeline share: above the diloco, codec and task they name
    "pipeline": 8,
    "cli": 9, "peers": 9,
}


def _part(module: str) -> str | None:
    """The part of `swarm.X.Y` (X), with the folders installed inside the namespace by their own name."""
    parts = module.split(".")
    if parts[0] in ("kernels", "peers", "scripts"):  # a bare top-level import of a repo folder
        return parts[0]
    if parts[0] != "swarm":
        return None
    return parts[1] if len(parts) > 1 else "swarm"


def _module_of(path: Path) -> str:
    rel = list(path.relative_to(REPO).with_suffix("").parts)
    rel[0] = {"kernels": "swarm.kernels", "peers": "swarm.peers"}.get(rel[0], rel[0])
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in the file, function-level (lazy) ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return found


def _sources() -> list[Path]:
    return sorted(p for folder in ("swarm", "kernels", "peers") for p in (REPO / folder).rglob("*.py")
                  if "proto" not in p.relative_to(REPO).parts)


def _violations(path: Path, module: str) -> list[str]:
    """The imports of `path` (the module `module`) that go to its own layer's side or above."""
    me = _part(module)
    if me == "swarm":
        return []  # the package's face re-exports (lazily) from every layer
    assert me in RANK, f"{path}: part {me!r} has no place in the layering; add it to RANK (and DESIGN.md)"
    wrong = []
    for line, imported in _imports(path):
        other = _part(imported)
        if other is not None and other != me and (other not in RANK or RANK[other] >= RANK[me]):
            wrong.append(f"{path.name}:{line}: {me} imports {imported} ({other})")
    return wrong


def test_every_part_imports_only_parts_below_it() -> None:
    wrong = [v for path in _sources() for v in _violations(path, _module_of(path))]
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_library_never_imports_the_daemon_or_the_scripts() -> None:
    wrong = [f"{path.relative_to(REPO)}:{line}: {module}"
             for path in _sources() if path.relative_to(REPO).parts[0] in ("swarm", "kernels")
             for line, module in _imports(path) if _part(module) in ("peers", "scripts")]
    assert not wrong, "swarm/ must not import peers/ or scripts/:\n" + "\n".join(wrong)


def test_the_layering_check_catches_upward_lazy_and_script_imports(tmp_path: Path) -> None:
    # The check itself must be able to fail: a transport module importing the peer layer inside a
    # function, the daemon, and a script.
    bad = tmp_path / "bad.py"
    bad.write_text("import scripts.bench_codecs\n\ndef f():\n    from swarm.peer import Peer\n    import swarm.peers.daemon\n")
    assert len(_violations(bad, "swarm.transport.bad")) == 3
    assert _violations(bad, "swarm.peers.daemon2") == ["bad.py:1: peers imports scripts.bench_codecs (scripts)"]


def _runtime_imports(path: Path) -> list[str]:
    """The swarm modules `path` imports when it runs (imports under `if TYPE_CHECKING:` left out)."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                   for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from swarm.x import y` imports swarm.x.y when that is a module, else swarm.x (its __init__).
            found += [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in _MODULES else node.module
                      for a in node.names]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
    return [m for m in found if m in _MODULES]


_MODULES = {_module_of(p): p for p in _sources()}


def _cycle(graph: dict[str, list[str]]) -> list[str]:
    """One import cycle of `graph` (module -> the modules it imports), or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        path.append(m)
        for n in graph.get(m, []):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return []


def test_no_two_modules_import_each_other() -> None:
    graph = {m: [n for n in _runtime_imports(p) if n != m] for m, p in _MODULES.items()}
    cycle = _cycle(graph)
    assert not cycle, "an import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == ["a", "b", "c", "a"]
    assert _cycle({"a": ["b"], "b": [], "c": ["a", "b"]}) == []


# A concept fits one file of about 500 lines (issue 17 split the last files over it).
LONG_FILES: dict[str, int] = {}
LINE_LIMIT = 520


@pytest.mark.parametrize("path", [p.relative_to(REPO).as_posix() for p in _sources()])
def test_a_file_holds_one_concept_of_about_500_lines(path: str) -> None:
    lines = len((REPO / path).read_text().splitlines())
    assert lines <= LONG_FILES.get(path, LINE_LIMIT), f"{path} has {lines} lines; split it by concept"


def test_the_coordinator_and_the_relay_run_without_importing_torch() -> None:
    """A coordinator serving 10,000 peers, or a relay, should not carry torch's ~200 MB (issue 22)."""
    code = ("import sys\n"
            "from swarm.cli.main import _command, build_parser\n"
            "for argv in (['coordinator', '--port', '0'], ['--log-level', 'INFO', 'relay'],\n"
            "             ['status', '--coordinator', 'h:1']):\n"
            "    build_parser(_command(argv)).parse_known_args(argv)\n"
            "import swarm.coordinator.server, swarm.transport.relay\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout[:400]
