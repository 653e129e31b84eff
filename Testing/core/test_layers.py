"""The package's layer order, read from every module's imports (function-level ones included).

core < io, imaging, physics < synthetic, purification, denoiser < training < app
(docs/architecture.md). A layer imports only lower ranks; layers of one rank do not import each
other. Only app/ (and the Slicer module IPv2Denoise.py beside the package) touch Slicer, Qt, CTK
or VTK. No ``_private`` name is imported from another module.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "IPv2Denoise" / "IPv2DenoiseLib"
SLICER_MODULE = REPO / "IPv2Denoise" / "IPv2Denoise.py"

#: Rank of each layer; the package's own ``__init__`` (re-exports of core) counts as core,
#: ``__main__`` (runs the CLI) as app.
RANK = {
    "core": 0,
    "io": 1,
    "imaging": 1,
    "physics": 1,
    "synthetic": 2,
    "purification": 2,
    "denoiser": 2,
    "training": 3,
    "app": 4,
}
GUI_MODULES = {
    "slicer",
    "qt",
    "ctk",
    "vtk",
    "vtkmodules",
    "qSlicerBaseQTCorePythonQt",
    "DICOMLib",
    "SampleData",
}
GUI_LAYERS = {"app"}
#: Only these third-party imports may run when Slicer loads the module: Slicer bundles them, and the
#: rest (torch, pydicom, scikit-image, tqdm ...) is installed later by ensure_in_slicer.
SLICER_BUNDLED = {"numpy", "slicer", "qt", "ctk", "vtk"}  # not psutil: Slicer does not ship it


@dataclass(frozen=True)
class Import:
    source: str  # dotted module name of the importing file
    target: str  # dotted module name imported from
    names: tuple[str, ...]  # names imported by ``from target import ...``; empty for ``import target``
    line: int
    top_level: bool  # module or class level (also under try/if), not inside a function
    typing_only: bool = False  # under ``if TYPE_CHECKING:``: never runs

    def where(self) -> str:
        return f"{self.source}:{self.line}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str) -> list[Import]:
    """Every import statement of one file, with relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    in_functions = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for inner in ast.walk(node)
    }
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(
                    Import(
                        name,
                        alias.name,
                        (),
                        node.lineno,
                        id(node) not in in_functions,
                        id(node) in typing_only,
                    )
                )
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, target] if target else base)
            names = tuple(a.name for a in node.names)
            found.append(
                Import(
                    name, target, names, node.lineno, id(node) not in in_functions, id(node) in typing_only
                )
            )
    return found


def package_imports() -> list[Import]:
    return [imp for p in sorted(PACKAGE.rglob("*.py")) for imp in imports_of(p, module_name(p))]


def layer_of(module: str) -> str | None:
    """The layer of a dotted ``IPv2DenoiseLib...`` name; None outside the package."""
    parts = module.split(".")
    if parts[0] != "IPv2DenoiseLib":
        return None
    if len(parts) == 1:
        return "core"
    if parts[1] == "__main__":
        return "app"
    return parts[1]


def test_every_module_is_in_a_layer():
    stray = [
        module_name(p)
        for p in PACKAGE.rglob("*.py")
        if layer_of(module_name(p)) not in RANK and module_name(p) != "IPv2DenoiseLib"
    ]
    assert not stray, f"modules outside the layers {sorted(RANK)}: {stray}"


def test_layers_import_only_lower_ranks():
    wrong = []
    for imp in package_imports():
        src, dst = layer_of(imp.source), layer_of(imp.target)
        if dst is None or src == dst:
            continue
        if RANK[dst] >= RANK[src]:
            wrong.append(
                f"{imp.where()} ({src}, rank {RANK[src]}) imports {imp.target} ({dst}, rank {RANK[dst]})"
            )
    assert not wrong, "layer order broken:\n" + "\n".join(wrong)


def test_denoiser_needs_no_training_code():
    banned = {"training", "synthetic", "purification"}
    wrong = [
        f"{imp.where()} imports {imp.target}"
        for imp in package_imports()
        if layer_of(imp.source) == "denoiser" and layer_of(imp.target) in banned
    ]
    assert not wrong, "inference must not need training code:\n" + "\n".join(wrong)


def test_only_app_touches_slicer_qt_ctk_vtk():
    wrong = [
        f"{imp.where()} imports {imp.target}"
        for imp in package_imports()
        if imp.target.split(".")[0] in GUI_MODULES and layer_of(imp.source) not in GUI_LAYERS
    ]
    assert not wrong, "Slicer/Qt/CTK/VTK outside app/:\n" + "\n".join(wrong)


def test_no_private_names_across_modules():
    wrong = []
    for imp in package_imports():
        if layer_of(imp.target) is None or imp.target == imp.source:
            continue
        private = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
        if private or any(
            part.startswith("_") and not part.startswith("__") for part in imp.target.split(".")
        ):
            wrong.append(f"{imp.where()} imports {', '.join(private) or imp.target} from {imp.target}")
    assert not wrong, "private names imported across modules (give them a public home):\n" + "\n".join(wrong)


def test_tests_import_no_private_package_names():
    testing = REPO / "Testing"
    wrong = []
    for path in sorted(testing.rglob("*.py")):
        for imp in imports_of(path, path.stem):
            if layer_of(imp.target) is None:
                continue
            wrong += [
                f"{path.relative_to(REPO)}:{imp.line} imports {n}" for n in imp.names if n.startswith("_")
            ]
    assert not wrong, "\n".join(wrong)


def _top_level_closure(start: list[Import]) -> dict[str, str]:
    """Third-party top-level modules imported (at module level) when ``start`` runs, with one importer."""
    seen_modules: set[str] = set()
    third_party: dict[str, str] = {}
    todo = list(start)
    while todo:
        imp = todo.pop()
        if not imp.top_level or imp.typing_only:
            continue
        targets = [imp.target] + [f"{imp.target}.{n}" for n in imp.names]
        if layer_of(imp.target) is None:
            root = imp.target.split(".")[0]
            if root and root not in sys.stdlib_module_names and root != "__future__":
                third_party.setdefault(root, imp.where())
            continue
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                mod = ".".join(parts[:i])
                path = PACKAGE.parent.joinpath(*parts[:i])
                file = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
                if mod in seen_modules or not file.is_file():
                    continue
                seen_modules.add(mod)
                todo += imports_of(file, mod)
    return third_party


def test_slicer_module_loads_with_bundled_packages_only():
    """Loading IPv2Denoise.py in a fresh Slicer must not need torch or other not-yet-installed packages."""
    third_party = _top_level_closure(imports_of(SLICER_MODULE, "IPv2Denoise"))
    extra = {name: where for name, where in third_party.items() if name not in SLICER_BUNDLED | GUI_MODULES}
    assert not extra, f"imported when Slicer loads the module (make them lazy, with a comment): {extra}"


HEAVY_AT_START_UP = ("torch", "scipy", "skimage", "SimpleITK", "matplotlib")

#: Run in a fresh interpreter: build ``--help`` of the CLI or of one command, report what loaded.
_HELP_PROBE = """
import json, sys
from IPv2DenoiseLib.app.cli import main
try:
    main(sys.argv[1:] + ["--help"])
except SystemExit:
    pass
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})), file=sys.stderr)
"""


def _command_names() -> list[str]:
    from IPv2DenoiseLib.app.cli import command_modules

    return [module.NAME for module in command_modules()]


@pytest.mark.parametrize("command", ["", *_command_names()])
def test_help_loads_no_heavy_library(command):
    """``ipv2-denoise [COMMAND] --help`` in a real subprocess: what it imported, function-level
    imports inside ``add_arguments`` included, never holds torch, SciPy, scikit-image, SimpleITK
    or matplotlib (the start-up promise: ``--help`` answers at once)."""
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    argv = [command] if command else []
    done = subprocess.run(
        [sys.executable, "-c", _HELP_PROBE, *argv], capture_output=True, text=True, env=env, timeout=120
    )
    assert "usage:" in done.stdout, done.stderr
    loaded = set(json.loads(done.stderr.strip().splitlines()[-1]))
    heavy = sorted(loaded & set(HEAVY_AT_START_UP))
    assert not heavy, f"ipv2-denoise {command} --help imported {heavy}"


#: The only function-level imports below app/ (module, imported module), each for start-up or an
#: optional package; see "Imports" in docs/architecture.md.
LAZY_BELOW_APP = {
    ("IPv2DenoiseLib.core.device", "torch"),  # the device vocabulary is read before torch is needed
    ("IPv2DenoiseLib.core.progress", "tqdm"),  # the Slicer module loads progress before tqdm is installed
    # the model reference lists models and states provenance without torch (Slicer, --help)
    ("IPv2DenoiseLib.denoiser.model_reference", "IPv2DenoiseLib.denoiser.infer"),
    ("IPv2DenoiseLib.imaging.classical", "bm3d"),  # optional, non-commercial
}


def test_imports_at_module_top_below_app():
    wrong = sorted(
        f"{imp.where()} imports {imp.target} inside a function; move it to the top of the module"
        for imp in package_imports()
        if not imp.top_level
        and layer_of(imp.source) != "app"
        and (imp.source, imp.target) not in LAZY_BELOW_APP
    )
    assert not wrong, "\n".join(wrong)


def test_every_function_level_import_says_why():
    """A lazy import carries a ``# lazy: <reason>`` comment on its line or just above its group."""
    wrong = []
    for path in [SLICER_MODULE, *sorted(PACKAGE.rglob("*.py"))]:
        lines = path.read_text(encoding="utf-8").splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body_imports = [n for n in fn.body if isinstance(n, (ast.Import, ast.ImportFrom))]
            nested = [
                n
                for stmt in fn.body
                if not isinstance(stmt, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef))
                for n in ast.walk(stmt)
                if isinstance(n, (ast.Import, ast.ImportFrom))
            ]
            groups: list[list[ast.stmt]] = []
            for node in sorted(body_imports + nested, key=lambda n: n.lineno):
                if groups and node.lineno <= groups[-1][-1].end_lineno + 2:
                    groups[-1].append(node)
                else:
                    groups.append([node])
            for group in groups:
                first, last = group[0].lineno, group[-1].end_lineno
                context = "\n".join(lines[max(0, first - 3) : last])
                if "lazy" not in context:
                    wrong.append(f"{path.relative_to(REPO)}:{first}: {ast.unparse(group[0])}")
    assert not wrong, "function-level imports without a '# lazy: why' comment:\n" + "\n".join(wrong)


def test_commands_never_import_each_other():
    """What two commands share lives in app/arguments.py, app/pacs.py or app/pipeline.py (issue #22)."""
    wrong = sorted(
        imp.where()
        for imp in package_imports()
        if imp.source.startswith("IPv2DenoiseLib.app.commands.")
        and imp.target.startswith("IPv2DenoiseLib.app.commands.")
    )
    assert not wrong, "\n".join(wrong)
