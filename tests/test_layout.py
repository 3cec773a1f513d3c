"""The package is the product: sd3_adrpo/ never imports the tiny world (tinyworld/ is a client of the library,
reached only through the config, e.g. as a judge)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_module_of_the_package_imports_the_tiny_world():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in _imported_modules(p) if m.split(".")[0] == "tinyworld")
                 for p in sorted((ROOT / "sd3_adrpo").rglob("*.py"))}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert _imported_modules(ROOT / "tinyworld" / "scorers.py") >= {"sd3_adrpo.metrics"}  # the check reads imports


def test_importing_every_module_of_the_package_loads_no_tiny_world_module():
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "sd3_adrpo").rglob("*.py"))
    modules = [m.removesuffix(".__init__") for m in modules]
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tinyworld'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
