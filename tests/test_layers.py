"""The layering of the repository: `scaling/` is the top layer and the library never imports it,
except the command line (onerec_jax/cli.py), the face that calls into everything; lower layers
(data, tokenizer, model) never import the training layer; no module imports itself back through
others (function-level imports included: they hide cycles, they do not remove them)."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("onerec_jax", "scaling")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(path: pathlib.Path, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in its body (`from a import b` counts as
    a.b when that is a module, else a)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and not name.endswith("__init__"):
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(p, known) - {m} - {m.split(".")[0]} for m, p in mods.items()}


def test_only_the_cli_imports_scaling():
    offenders = sorted(
        m
        for m, deps in _graph().items()
        if m.startswith("onerec_jax") and m != "onerec_jax.cli"
        for d in deps
        if d.startswith("scaling")
    )
    assert offenders == []


def test_lower_layers_do_not_import_upper_ones():
    lower = ("onerec_jax.data", "onerec_jax.tokenizer", "onerec_jax.model")
    upper = ("onerec_jax.train", "onerec_jax.evaluate", "onerec_jax.generate", "onerec_jax.cli")
    bad = sorted(
        (m, d)
        for m, deps in _graph().items()
        if m.startswith(lower)
        for d in deps
        if d.startswith(upper)
    )
    assert bad == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append([*path[path.index(d) :], d])
            elif d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_checks_see_real_imports_and_cycles():
    """The tests above would pass on an empty graph: they must see the real imports, and the
    cycle finder must find a cycle where there is one."""
    graph = _graph()
    assert "onerec_jax.train.state" in graph["onerec_jax.train.loop"]
    assert "onerec_jax.model.rungs" in graph["onerec_jax.config"]
    assert "scaling.plan_cli" in graph["onerec_jax.cli"]  # a function-level import
    assert "scaling.ladder" in graph["scaling.plan_cli"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_python_file_is_over_400_lines():
    dirs = ("onerec_jax", "scaling", "experiments", "benchmarks", "tests")
    long = {
        str(p.relative_to(ROOT)): n
        for d in dirs
        for p in sorted((ROOT / d).rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert long == {}


def test_code_cites_no_document_outside_the_repository():
    """The repository explains itself: no pointers to design notes or issue numbers that a
    reader of the code cannot open."""
    words = ("DESIGN.md", "ANCHORS.md", "STYLE.md", "../shared", "issue #")
    dirs = ("onerec_jax", "scaling", "experiments", "benchmarks", "tests")
    hits = [
        f"{p.relative_to(ROOT)}: {w}"
        for d in dirs
        for p in sorted((ROOT / d).rglob("*.py"))
        for w in words
        if w in p.read_text() and p.name != "test_layers.py"
    ]
    assert hits == []
