"""numpydoc sections on the public entry points of ``io/``, ``imaging/`` and ``denoiser/`` (issue #22).

Each module is read with ``ast`` (nothing is imported, so the check needs no torch and stays fast)
and each docstring is parsed by numpydoc's own parser, ``numpydoc.docscrape.NumpyDocString``.
An entry point is a public function of the module's ``__all__`` (or, without ``__all__``, a public
top-level function or class defined there), a public class's ``__init__`` (documented in the class
docstring, as numpydoc asks; a dataclass's fields are its ``__init__``) and its public
classmethods. Each needs a docstring; a ``Parameters`` section naming every parameter but
``self``/``cls`` (keyword-only included; ``*args, **kwargs`` may share an entry); a ``Returns`` or
``Yields`` section when it returns something other than ``None``; and a ``Raises`` section naming
``UserError`` (or the subclass) when its own body raises one.
"""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
from numpydoc.docscrape import NumpyDocString

PACKAGE = Path(__file__).resolve().parents[2] / "IPv2Denoise" / "IPv2DenoiseLib"
CHECKED_FOLDERS = ("io", "imaging", "denoiser", "denoiser/models")
MODULES = sorted(path for folder in CHECKED_FOLDERS for path in (PACKAGE / folder).glob("*.py"))

NO_VALUE_RETURNS = frozenset({"None", "NoReturn", "Never"})
FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef


def user_error_classes() -> frozenset[str]:
    """``UserError`` and the package's subclasses of it (``Cancelled``, ``DestinationUnavailable`` …)."""
    bases: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases.setdefault(node.name, set()).update(
                    ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases
                )
    found = {"UserError"}
    while grown := {name for name, parents in bases.items() if parents & found} - found:
        found |= grown
    return frozenset(found)


#: The user-error classes whose ``raise`` needs a ``Raises`` section.
USER_ERRORS = user_error_classes()


def exported_names(tree: ast.Module) -> list[str] | None:
    """The string entries of the module's ``__all__``, or None when it has none."""
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and node.value is not None:
            return [elt.value for elt in node.value.elts if isinstance(elt, ast.Constant)]
    return None


def own_nodes(function: FunctionNode) -> list[ast.AST]:
    """The nodes of ``function``'s body, without those of functions or classes nested in it."""
    found: list[ast.AST] = []
    stack: list[ast.AST] = list(function.body)
    while stack:
        node = stack.pop()
        found.append(node)
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))
    return found


def parameter_names(function: FunctionNode, *, is_method: bool) -> list[str]:
    """The parameters a caller passes: positional, keyword-only, ``*args`` and ``**kwargs``."""
    arguments = function.args
    positional = [a.arg for a in (*arguments.posonlyargs, *arguments.args)]
    if is_method and positional:
        positional = positional[1:]
    extra = [a.arg for a in (arguments.vararg, arguments.kwarg) if a is not None]
    return positional + [a.arg for a in arguments.kwonlyargs] + extra


def returns_value(function: FunctionNode) -> bool:
    """Whether the function gives its caller a value (by its annotation, else by its returns)."""
    if function.name == "__init__":
        return False
    annotation = function.returns
    if annotation is not None:
        text = ast.unparse(annotation).strip("'\"")
        return text.rsplit(".", 1)[-1] not in NO_VALUE_RETURNS
    return any(
        isinstance(node, (ast.Yield, ast.YieldFrom))
        or (isinstance(node, ast.Return) and node.value is not None)
        for node in own_nodes(function)
    )


def raised_user_errors(function: FunctionNode) -> set[str]:
    """The user-error classes the function's own body raises."""
    raised = set()
    for node in own_nodes(function):
        if isinstance(node, ast.Raise) and node.exc is not None:
            target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
            if name in USER_ERRORS:
                raised.add(name)
    return raised


def parse(docstring: str, where: str, problems: list[str]) -> NumpyDocString:
    """numpydoc's reading of ``docstring``; its warnings (unknown sections …) become problems."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            doc = NumpyDocString(docstring)
        except ValueError as error:
            problems.append(f"{where}: numpydoc cannot parse the docstring: {error}")
            return NumpyDocString("")
    # numpydoc's own warnings only: a ResourceWarning of a file some earlier test left to the
    # garbage collector can fire inside this block too
    problems.extend(f"{where}: {w.message}" for w in caught if not issubclass(w.category, ResourceWarning))
    return doc


def documented_parameters(doc: NumpyDocString, section: str = "Parameters") -> set[str]:
    """Every name of a section (``Parameters`` by default; grouped entries such as ``a, b`` or
    ``*args, **kwargs`` split)."""
    names = set()
    for entry in doc[section]:
        names.update(part.strip().lstrip("*") for part in entry.name.split(","))
    return names


def check_callable(
    where: str, docstring: str | None, function: FunctionNode, *, is_method: bool, problems: list[str]
) -> None:
    """Add to ``problems`` what ``docstring`` lacks for ``function``'s signature and body."""
    if not docstring:
        problems.append(f"{where}: no docstring")
        return
    doc = parse(docstring, where, problems)
    parameters = parameter_names(function, is_method=is_method)
    missing = [name for name in parameters if name not in documented_parameters(doc)]
    if missing:
        problems.append(f"{where}: Parameters section lacks {missing}")
    if returns_value(function) and not (doc["Returns"] or doc["Yields"]):
        problems.append(f"{where}: no Returns section")
    raised = raised_user_errors(function)
    named = {entry.type.strip() for entry in doc["Raises"]} | {entry.name.strip() for entry in doc["Raises"]}
    if raised - named:
        problems.append(f"{where}: Raises section lacks {sorted(raised - named)}")


def is_dataclass(node: ast.ClassDef) -> bool:
    """Whether the class is decorated with ``@dataclass`` (with or without arguments)."""
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if ast.unparse(target).rsplit(".", 1)[-1] == "dataclass":
            return True
    return False


def dataclass_fields(node: ast.ClassDef) -> list[str]:
    """The fields a dataclass's generated ``__init__`` takes (not ``ClassVar``, not ``init=False``)."""
    fields = []
    for statement in node.body:
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        if "ClassVar" in ast.unparse(statement.annotation) or statement.target.id.startswith("_"):
            continue
        value = statement.value
        if isinstance(value, ast.Call) and any(
            k.arg == "init" and isinstance(k.value, ast.Constant) and k.value.value is False
            for k in value.keywords
        ):
            continue
        fields.append(statement.target.id)
    return fields


def check_class(where: str, node: ast.ClassDef, problems: list[str]) -> int:
    """The class docstring documents ``__init__``; each public classmethod has its own sections.

    Returns how many entry points (the class and its public classmethods) were checked."""
    docstring = ast.get_docstring(node)
    methods = {m.name: m for m in node.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))}
    if "__init__" in methods:
        check_callable(where, docstring, methods["__init__"], is_method=True, problems=problems)
    elif not docstring:
        problems.append(f"{where}: no docstring")
    elif is_dataclass(node):
        doc = parse(docstring, where, problems)
        named = documented_parameters(doc) | documented_parameters(doc, "Attributes")
        missing = [name for name in dataclass_fields(node) if name not in named]
        if missing:
            problems.append(f"{where}: Parameters (or Attributes) section lacks the fields {missing}")
    count = 1
    for name, method in methods.items():
        decorators = {ast.unparse(d) for d in method.decorator_list}
        if "classmethod" in decorators and not name.startswith("_"):
            count += 1
            check_callable(
                f"{where}.{name}", ast.get_docstring(method), method, is_method=True, problems=problems
            )
    return count


def entry_point_problems(module: Path) -> tuple[int, list[str]]:
    """How many entry points ``module`` has, and what their docstrings lack."""
    tree = ast.parse(module.read_text(encoding="utf-8"))
    defined = {
        node.name: node
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    }
    names = exported_names(tree)
    if names is None:
        names = [name for name in defined if not name.startswith("_")]
    problems: list[str] = []
    count = 0
    for name in names:
        node = defined.get(name)  # re-exports and constants are checked in their own home, or not at all
        if isinstance(node, ast.ClassDef):
            count += check_class(name, node, problems)
        elif node is not None:
            count += 1
            check_callable(name, ast.get_docstring(node), node, is_method=False, problems=problems)
    return count, problems


@pytest.mark.parametrize("module", MODULES, ids=lambda path: path.relative_to(PACKAGE).as_posix())
def test_public_entry_points_have_numpydoc_sections(module: Path) -> None:
    _, problems = entry_point_problems(module)
    assert not problems, f"{module.relative_to(PACKAGE)}:\n" + "\n".join(problems)


def test_the_check_sees_a_missing_section() -> None:
    """The check itself: a function without its sections is reported, one with them is not."""
    source = '''
from IPv2DenoiseLib.core.errors import UserError

def bare(path: str, *, strict: bool = False) -> int:
    """Count."""
    raise UserError("no")

def documented(path: str, *args: int, strict: bool = False, **kwargs: int) -> int:
    """Count.

    Parameters
    ----------
    path : str
        Where.
    *args, **kwargs : int
        Passed on.
    strict : bool
        Whether.

    Returns
    -------
    int
        How many.

    Raises
    ------
    UserError
        When.
    """
    raise UserError("no")
'''
    tree = ast.parse(source)
    bare, documented = (node for node in tree.body if isinstance(node, ast.FunctionDef))
    problems: list[str] = []
    check_callable("bare", ast.get_docstring(bare), bare, is_method=False, problems=problems)
    assert problems == [
        "bare: Parameters section lacks ['path', 'strict']",
        "bare: no Returns section",
        "bare: Raises section lacks ['UserError']",
    ]
    problems.clear()
    check_callable(
        "documented", ast.get_docstring(documented), documented, is_method=False, problems=problems
    )
    assert problems == []
