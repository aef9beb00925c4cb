"""compat is true and kept true: no private name of TRL, transformers, DeepSpeed, HfArgumentParser or argparse is used
anywhere in the package but `srpo_trl/compat/`, except what a class must override or set of its library base class
(`compat.EXTENSION_POINTS`, checked both ways). Built from the package's syntax trees, not from a grep."""

import ast
import importlib
import inspect
import textwrap
from pathlib import Path

import srpo_trl
from srpo_trl import compat

PACKAGE = Path(srpo_trl.__file__).parent


def is_private(name: str) -> bool:
    return name.startswith("_") and name != "_" and not (name.startswith("__") and name.endswith("__"))


def private_uses(tree: ast.AST) -> set[str]:
    """The private names a module reads or writes of other objects: `x._name`, `from lib import _name`,
    `getattr(x, "_name")` (and `setattr`/`hasattr`/`delattr`)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            names.add(node.attr)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.update(alias.name for alias in node.names if is_private(alias.name))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and is_private(node.args[1].value)
        ):
            names.add(node.args[1].value)
    return names


def definitions(tree: ast.AST) -> set[str]:
    """The names a module defines: functions, classes, assigned names and assigned attributes (`self._x = ...`)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return names


def class_members(tree: ast.AST) -> dict[str, set[str]]:
    """Per class: the private names its body defines or assigns, and the `self._x` its methods assign."""
    members = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            names = set()
            for statement in node.body:
                if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(statement.name)
                elif isinstance(statement, (ast.Assign, ast.AnnAssign)):
                    targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
                    names.update(target.id for target in targets if isinstance(target, ast.Name))
            names.update(
                child.attr
                for child in ast.walk(node)
                if isinstance(child, ast.Attribute)
                and isinstance(child.ctx, ast.Store)
                and isinstance(child.value, ast.Name)
                and child.value.id == "self"
            )
            members[node.name] = {name for name in names if is_private(name)}
    return members


def library_names(cls: type) -> set[str]:
    """The private names `cls`'s library base classes (any class in its MRO not from srpo_trl) define: members, and
    the attributes their methods assign to `self`."""
    names = set()
    for base in cls.__mro__[1:]:
        if base.__module__.startswith("srpo_trl") or base is object:
            continue
        names.update(name for name in vars(base) if is_private(name))
        try:
            source = textwrap.dedent(inspect.getsource(base))
        except (OSError, TypeError):
            continue
        names.update(name for name in definitions(ast.parse(source)) if is_private(name))
    return names


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        yield relative, ast.parse(path.read_text(encoding="utf-8"))


def outside_compat():
    return [(path, tree) for path, tree in modules() if path.parts[0] != "compat"]


def foreign_private_uses(sources: list[tuple[Path, ast.AST]], defined: set[str]) -> dict[str, set[str]]:
    """Private names used in `sources` that srpo_trl does not define outside compat: they can only be a library's."""
    found = {}
    for path, tree in sources:
        for name in private_uses(tree) - defined:
            found.setdefault(name, set()).add(str(path))
    return found


def srpo_members(cls: type) -> set[str]:
    """The private names `cls` and the srpo_trl classes it inherits (its mixins) define."""
    members = set()
    for base in cls.__mro__:
        if base.__module__.startswith("srpo_trl") and not base.__module__.startswith("srpo_trl.compat"):
            members |= class_members(ast.parse(textwrap.dedent(inspect.getsource(base))))[base.__name__]
    return members


def overridden_library_names() -> dict[str, set[str]]:
    """Private names of library base classes that srpo_trl's classes (with their mixins) define: override or set."""
    found = {}
    for path, tree in outside_compat():
        if path.name == "__main__.py":  # runs its command when imported; defines no class
            continue
        module = importlib.import_module("srpo_trl." + ".".join(path.with_suffix("").parts).removesuffix(".__init__"))
        for class_name in class_members(tree):
            cls = getattr(module, class_name, None)
            if not inspect.isclass(cls):
                continue
            for name in srpo_members(cls) & library_names(cls):
                found.setdefault(name, set()).add(f"{path}:{class_name}")
    return found


def package_definitions() -> set[str]:
    return set().union(*(definitions(tree) for _, tree in outside_compat()))


def test_no_library_private_name_is_used_outside_compat():
    used = foreign_private_uses(outside_compat(), package_definitions())
    assert not used, f"private names of a library used outside srpo_trl/compat/ (move them there): {used}"


def test_extension_points_are_exactly_what_the_package_overrides_or_sets():
    overridden = overridden_library_names()
    unlisted = {name: where for name, where in overridden.items() if name not in compat.EXTENSION_POINTS}
    assert not unlisted, f"library private names overridden or set, missing from compat.EXTENSION_POINTS: {unlisted}"
    stale = set(compat.EXTENSION_POINTS) - set(overridden)
    assert not stale, f"compat.EXTENSION_POINTS lists names nothing overrides any more: {stale}"


def test_the_check_fails_on_a_library_private_name():
    # The checks above must be able to fail: a module reading GRPOTrainer's metric buffers, or importing a private
    # kernel, or reaching a private attribute through getattr, is caught.
    snippet = ast.parse(
        "from trl.kernels.chunked_logprob import _addmm_fp32\n"
        "def log(trainer, value):\n"
        "    trainer._metrics['train']['x'].append(value)\n"
        "    return getattr(trainer, '_dist')\n"
    )
    found = foreign_private_uses([(Path("snippet.py"), snippet)], package_definitions())
    assert set(found) == {"_addmm_fp32", "_metrics", "_dist"}


def test_the_override_check_fails_on_an_unlisted_override():
    source = "class Sneaky(GRPOTrainer):\n    def _prepare_inputs(self, inputs):\n        return inputs\n"
    from trl import GRPOTrainer

    namespace = {"GRPOTrainer": GRPOTrainer}
    exec(source, namespace)
    members = class_members(ast.parse(source))["Sneaky"]
    assert members & library_names(namespace["Sneaky"]) == {"_prepare_inputs"}
