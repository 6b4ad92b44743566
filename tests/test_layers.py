"""The library's layering, as rodin/__init__.py writes it: every import of every module (those
inside functions too) runs from a stage to the stages before it, never back up, never in a
circle, and never into a script. Read with the ast module, nothing imported."""

import ast
import os
import re

from conftest import ROOT

SCRIPTS = {"train", "sft", "export", "data", "bench"}  # top-level scripts and their folders


def modules():
    """{dotted name: path} of every module of the library."""
    found = {}
    for folder, _, names in os.walk(os.path.join(ROOT, "rodin")):
        for name in names:
            if name.endswith(".py"):
                dotted = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = os.path.join(folder, name)
    return found


def imports(path, known):
    """The library modules and the top-level names a module imports, anywhere in it."""
    library, top = set(), set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "rodin":
                library.add(name)
            else:
                top.add(name.split(".")[0])
    return library, top


def order():
    """The stages in the order rodin/__init__.py's docstring writes: [{names of a stage}, ...]."""
    with open(os.path.join(ROOT, "rodin", "__init__.py"), encoding="utf-8") as f:
        line = next(line for line in f if "<-" in line)
    return [set(re.findall(r"[a-z_]+", stage)) for stage in line.split("<-")]


def stage_of(module):
    """Index of a module's stage: its package (rodin.train.loop: train) or, at the top, its name."""
    parts = module.split(".")
    if len(parts) == 1:
        return None  # rodin itself: the torch check, imports nothing of rodin
    if parts[1] == "__main__":
        return len(order())  # the commands, above every stage
    return next(i for i, stage in enumerate(order()) if parts[1] in stage)


def test_the_order_names_every_package_and_top_module():
    named = set().union(*order())
    top = {m.split(".")[1] for m in modules() if m.count(".") >= 1 and m.split(".")[1] != "__main__"}
    assert top == named, f"rodin/__init__.py's order should name exactly {sorted(top)}"


def test_every_import_runs_from_a_stage_to_the_stages_before_it():
    known = modules()
    wrong = []
    for module, path in known.items():
        library, _ = imports(path, known)
        for target in library:
            if target == "rodin":
                continue
            here, there = stage_of(module), stage_of(target)
            if here is None or there > here:
                wrong.append(f"{module} imports {target}")
    assert not wrong, wrong


def test_the_library_imports_no_script_and_the_model_only_torch():
    known = modules()
    for module, path in known.items():
        _, top = imports(path, known)
        assert not top & SCRIPTS, f"{module} imports a script: {top & SCRIPTS}"
    _, model_top = imports(known["rodin.model"], known)
    assert model_top <= {"torch", "math", "dataclasses"}, model_top  # the standard library's, and torch


def test_no_import_circle():
    known = modules()
    graph = {m: {t for t in imports(p, known)[0] if t in known and t != "rodin" and t != m} for m, p in known.items()}
    state = {}

    def visit(module, path):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", " -> ".join(path + [module])
        state[module] = "open"
        for target in graph[module]:
            visit(target, path + [module])
        state[module] = "done"

    for module in graph:
        visit(module, [])
