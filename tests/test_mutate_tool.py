"""tools/mutate.py (`make mutate`, issue 18): the scopes name real functions, and docs/mutation-equivalents.md lists
only mutants that the scopes produce (its names are mutmut's: a stale one would be set aside silently)."""

from __future__ import annotations

import ast
import fnmatch
import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("mutate_tool", ROOT / "tools" / "mutate.py")
mutate = sys.modules["mutate_tool"] = importlib.util.module_from_spec(spec)  # its dataclass looks itself up there
spec.loader.exec_module(mutate)


def _functions(module: str) -> set[str]:
    """The module's functions and methods, as "name" and "Class.method"."""
    tree = ast.parse((ROOT / "src" / "facevae" / f"{module}.py").read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{f.name}" for f in node.body if isinstance(f, ast.FunctionDef)}
    return names


def test_every_scoped_function_exists_and_every_selected_test_file_too():
    for module, scope in mutate.SCOPES.items():
        functions = _functions(module)
        for pattern in scope.functions:
            assert fnmatch.filter(functions, pattern), f"{module}: no function matches {pattern}"
        for selection in scope.tests:
            assert (ROOT / selection.split("::")[0]).is_file(), selection


def test_mutant_names_follow_mutmuts_mangling():
    patterns = dict(zip(mutate.SCOPES["train"].functions, mutate.mutant_patterns("train")))
    assert patterns["epoch_order"] == "facevae.train.x_epoch_order__mutmut_*"
    assert patterns["Trainer._batch"] == "facevae.train.x\u01c1Trainer\u01c1_batch__mutmut_*"
    assert mutate.mutant_patterns("data/cache")[0].startswith("facevae.data.cache.x_")


def test_every_listed_equivalent_is_a_mutant_in_scope():
    listed = mutate.listed_equivalents()
    assert len(listed) > 50
    for name in listed:
        module = re.match(r"facevae\.([\w.]+?)\.x", name).group(1).replace(".", "/")
        assert module in mutate.SCOPES, name
        patterns = mutate.mutant_patterns(module)
        assert not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns), f"{name} is out of scope"


def test_the_groups_run_every_module_once():
    assert sorted(m for group in mutate.GROUPS for m in group) == sorted(mutate.MODULES)
