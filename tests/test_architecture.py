"""The import floors of ARCHITECTURE.md, read from the source with `ast` (nothing is imported):
no module imports from a floor above its own, the ops and kernels stay free of Flax, and the
floor table names every module (a new module must be placed on a floor)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Lowest first, as ARCHITECTURE.md draws them. A module matches the longest prefix listed.
FLOORS = [
    ("kernels", ["pallas_kernels"]),
    ("ops", ["gsa_jax.ops"]),
    ("layers", ["gsa_jax.layers"]),
    ("models", ["gsa_jax.models", "gsa_jax.generation", "gsa_jax.flops", "gsa_jax.hf"]),
    ("session/steps", ["gsa_jax.session", "gsa_jax.steps", "gsa_jax.config", "gsa_jax.evaluate"]),
    ("train", ["gsa_jax.train", "gsa_jax.convert", "gsa_jax.export",
               "gsa_jax.lm_eval_adapter"]),
    ("cli/experiments", ["gsa_jax.cli", "gsa_jax.demo", "experiments"]),
]
# Argument rules (one function per rule): imports nothing of the project; every floor of
# gsa_jax may use it, the ops included (the kernels stay free of gsa_jax).
BASE = ["gsa_jax.checks"]
# Helpers that import no model code (only each other): any floor from layers up may use them.
SUPPORT = ["gsa_jax.errors", "gsa_jax.sharding", "gsa_jax.optim", "gsa_jax.checkpoint",
           "gsa_jax.data", "gsa_jax.run_lock", "gsa_jax.profiling", "gsa_jax._xla_cpu",
           "gsa_jax.layer_layout"]
# Package __init__ files import their own floor's modules; the package `gsa_jax` re-exports ops.
PACKAGE = "gsa_jax"
PURE = ("kernels", "ops")  # no Flax: pure functions (DESIGN.md)


def _modules():
    """{dotted module name: path} for the library, the kernels and the experiments."""
    found = {}
    for top in ("gsa_jax", "pallas_kernels", "experiments"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _match(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def floor_of(name):
    """Index into FLOORS, "base", "support", "package", or None (unplaced)."""
    if name == PACKAGE:
        return "package"
    if _match(name, BASE):
        return "base"
    if _match(name, SUPPORT):
        return "support"
    for i, (_, prefixes) in enumerate(FLOORS):
        if _match(name, prefixes):
            return i
    return None


def imported_modules(name, path):
    """Dotted names of the project modules `name` imports (at any depth: lazy imports count).
    `from pkg import x` counts as pkg.x where x is a module, else as pkg."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                       for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in MODULES or t.split(".")[0] in
                ("gsa_jax", "pallas_kernels", "experiments", "tests")}
    out.discard(name)
    return out


def _flax_imports(path):
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return sorted(n for n in names if n.split(".")[0] == "flax")


def test_every_module_has_a_floor():
    unplaced = sorted(n for n in MODULES if floor_of(n) is None)
    assert not unplaced, (f"modules on no floor (add them to FLOORS or SUPPORT here and to "
                          f"ARCHITECTURE.md): {unplaced}")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_import_from_a_floor_above(name):
    mine = floor_of(name)
    bad = []
    for target in sorted(imported_modules(name, MODULES[name])):
        theirs = floor_of(target)
        if target.split(".")[0] == "tests":
            bad.append(f"{target} (tests are above everything)")
        elif mine == "base":
            bad.append(f"{target} (the base rules import nothing of the project)")
        elif theirs == "base":
            if mine == 0:
                bad.append(f"{target} (the kernels import nothing of gsa_jax)")
        elif mine == "package":
            if theirs not in ("support", 1):
                bad.append(f"{target} (the package re-exports the ops only)")
        elif mine == "support":
            if theirs != "support":
                bad.append(f"{target} (support modules import only each other)")
        elif theirs == "support":
            if mine < 2:
                bad.append(f"{target} ({FLOORS[mine][0]} import no support module)")
        elif theirs == "package":
            if mine < 2:
                bad.append(f"{target} (the package __init__ imports the ops: a cycle)")
        elif theirs is None or theirs > mine:
            where = "no floor" if theirs is None else f"floor {FLOORS[theirs][0]}"
            bad.append(f"{target} ({where}, above {FLOORS[mine][0]})")
    assert not bad, f"{name} imports upward: {bad}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if floor_of(n) in (0, 1)))
def test_ops_and_kernels_import_no_flax(name):
    assert not _flax_imports(MODULES[name]), f"{name} is {PURE} code and must not import Flax"
