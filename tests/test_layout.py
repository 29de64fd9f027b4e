"""Imports run one way (docs/ARCHITECTURE.md): the model and data layers never reach up into the
parallel strategies, the RL library, the trainers or the run modules; the rollout server never
imports the trainer library."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# folder -> the longrl_jax modules (prefixes) it may import
ALLOWED = {
    "longrl_jax/models": ("longrl_jax.models", "longrl_jax.parallel.mesh"),
    "longrl_jax/data": ("longrl_jax.data",),
    "longrl_jax/parallel": ("longrl_jax.parallel", "longrl_jax.models"),
    "rollout_server": (),
}


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every absolute module a file imports, at any depth (lazy imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_lower_layers_import_nothing_above_them(folder):
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for mod in imported_modules(path):
            if mod.split(".")[0] != "longrl_jax":
                continue
            if mod in ("longrl_jax.models", "longrl_jax.data", "longrl_jax.parallel"):
                mod_ok = any(a.startswith(mod) for a in ALLOWED[folder])
            else:
                mod_ok = any(mod == a or mod.startswith(a + ".") for a in ALLOWED[folder])
            if not mod_ok:
                bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not bad, "\n".join(bad)
