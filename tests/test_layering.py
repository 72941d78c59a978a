"""The layering ARCHITECTURE.md promises: shards/ (the contract) imports nothing of the halves above it, and
pipeline/ (vtt-prep) nothing of trainer/ (vtt-train), so vtt-prep never pulls in torch or transformers."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {"shards": ("vtt.pipeline", "vtt.trainer"), "pipeline": ("vtt.trainer",)}


def imported_modules(path: Path) -> set[str]:
    """Every module an `import` or `from ... import` names anywhere in the file (inside functions too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_lower_layers_import_nothing_above_them(folder):
    bad = [f"{p.relative_to(REPO)} imports {m}" for p in sorted((REPO / folder).glob("*.py"))
           for m in sorted(imported_modules(p)) if m.startswith(FORBIDDEN[folder])]
    assert not bad, bad


def test_the_scan_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from vtt.trainer.text import x\n")
    assert "vtt.trainer.text" in imported_modules(f)


def test_vtt_prep_loads_no_trainer_module():
    """At run time too: the CLI and the annotation reader (which checks conversations) load nothing of trainer/."""
    code = ("import sys, vtt.pipeline.cli, vtt.pipeline.annotations, vtt.pipeline.run; "
            "print(sorted(m for m in sys.modules if m.startswith('vtt.trainer')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
