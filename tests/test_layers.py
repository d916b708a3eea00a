"""The layering of the repository: `scaling/` is the top layer; the library never imports it,
except the command line (onerec_jax/cli.py), the face that calls into everything."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_cli_imports_scaling():
    offenders = [
        str(p.relative_to(ROOT))
        for p in sorted((ROOT / "onerec_jax").rglob("*.py"))
        if p.name != "cli.py" and "scaling" in _imports(p)
    ]
    assert offenders == []


def test_no_python_file_is_over_400_lines():
    dirs = ("onerec_jax", "scaling", "experiments", "benchmarks", "tests")
    long = {
        str(p.relative_to(ROOT)): n
        for d in dirs
        for p in sorted((ROOT / d).rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert long == {}
