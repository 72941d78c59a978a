"""The layering ARCHITECTURE.md promises: shards/ (the contract) imports nothing of the halves above it, and
pipeline/ (vtt-prep) nothing of trainer/ (vtt-train), so vtt-prep never pulls in torch or transformers; and no
import cycle among vtt's modules, counting imports inside functions (a lazy import hides a cycle, it does not
remove it)."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {"shards": ("vtt.pipeline", "vtt.trainer"), "pipeline": ("vtt.trainer",)}
PACKAGES = ("shards", "pipeline", "trainer", "configs")  # folder -> vtt.<folder> (setup.cfg's package_dir)


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
    f.write_text("def f():\n    from vtt.trainer.inputs.text import x\n")
    assert "vtt.trainer.inputs.text" in imported_modules(f)


def test_vtt_prep_loads_no_trainer_module():
    """At run time too: the CLI and the annotation reader (which checks conversations) load nothing of trainer/."""
    code = ("import sys, vtt.pipeline.cli, vtt.pipeline.annotations, vtt.pipeline.run; "
            "print(sorted(m for m in sys.modules if m.startswith('vtt.trainer')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def module_files(root: Path, folders=PACKAGES, prefix: str = "vtt") -> dict[str, Path]:
    """Module name -> file for every .py under the folders (subpackages too; __init__.py is the package)."""
    out = {}
    for folder in folders:
        for p in sorted((root / folder).rglob("*.py")):
            parts = [prefix, folder, *p.relative_to(root / folder).with_suffix("").parts]
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of `files` it imports anywhere (module level or inside functions): `import a.b`,
    `from a import b` (b a module or a name of a), relative imports resolved against the module's package."""
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                edges |= {module} | {f"{module}.{a.name}" for a in node.names}
        graph[name] = {m for m in edges if m in files and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: strongly connected components of more than one module (Tarjan, iterative), each
    sorted, listed in name order."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def test_no_import_cycles():
    files = module_files(REPO)
    assert "vtt.trainer.models.registry" in files and "vtt.shards.format" in files  # the scan sees the real tree
    graph = import_graph(files)
    assert "vtt.trainer.models.model_io" in graph["vtt.trainer.models.llava"]
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(
        " <-> ".join(c) + " (" + ", ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) + ")" for c in found)


def test_the_cycle_check_sees_lazy_and_from_package_imports(tmp_path):
    """A cycle closed by an import inside a function, through `from package import module`, is found; a chain
    without one is not."""
    pkg = tmp_path / "trainer"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from vtt.trainer import b\n")
    (pkg / "b.py").write_text("import os\nfrom .sub.c import x\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("x = 1\ndef f():\n    from vtt.trainer.a import y\n")
    graph = import_graph(module_files(tmp_path, ("trainer",)))
    assert cycles(graph) == [["vtt.trainer.a", "vtt.trainer.b", "vtt.trainer.sub.c"]]
    (pkg / "sub" / "c.py").write_text("x = 1\n")
    assert cycles(import_graph(module_files(tmp_path, ("trainer",)))) == []


# An import inside a function says why it is not at the module's top: an optional dependency, a heavy one the
# module's light callers must not pay for, or an import cycle. The tag sits on the import line or the line above;
# a comment above a run of consecutive import lines covers the run.
WHY_TAG = re.compile(r"#\s*(optional|heavy|cycle):")


def unexplained_function_imports(path: Path) -> list[str]:
    """`file:line` of every import inside a function with no why-tag on its line or above its run of imports."""
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines), str(path))
    out = []
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            at = node.lineno - 1
            if WHY_TAG.search(lines[at]):
                continue
            above = at - 1
            while above >= 0 and re.match(r"\s*(import|from)\s", lines[above]) and not WHY_TAG.search(lines[above]):
                above -= 1
            if above < 0 or not WHY_TAG.search(lines[above]):
                out.append(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{node.lineno}")
    return sorted(set(out))


def test_imports_inside_functions_say_why():
    bad = [b for folder in ("pipeline", "shards", "trainer") for p in sorted((REPO / folder).rglob("*.py"))
           for b in unexplained_function_imports(p)]
    assert not bad, "imports inside functions without '# optional: / # heavy: / # cycle:' (move them to the " \
                    "module's top, or say why not): " + ", ".join(bad)


def test_the_why_check_sees_an_unexplained_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef f():\n    # heavy: torch\n    import torch\n    import torch.nn\n    x = 1\n"
                 "    import json\n\ndef g():\n    import ray  # optional: ray\n")
    assert unexplained_function_imports(f) == [f"{f}:8"]


def test_the_cli_modules_load_no_torch():
    """vtt-prep --help and vtt-train -h stay fast: their modules import no torch, transformers or deepspeed."""
    code = ("import sys, vtt.pipeline.cli, vtt.trainer.cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'deepspeed', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
