"""The house rules that keep a knob in one place: no module but bench.space spells a parameter name."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from bench.space import TrainConfig, build_space

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = BENCH.parent / "scripts"
PARAMETER_NAMES = frozenset({f.name for f in dataclasses.fields(TrainConfig)} | {p.name for p in build_space()})
TORCH_KEYS = frozenset({"lr"})  # torch's own key of a param group's learning rate: group["lr"]


def _torch_key(node: ast.Constant, parents: dict[ast.AST, ast.AST]) -> bool:
    """`x["lr"]` where x is a param group (torch's key, not bench's knob): `group[...]` or `....param_groups[i][...]`."""
    parent = parents.get(node)
    if not (node.value in TORCH_KEYS and isinstance(parent, ast.Subscript) and parent.slice is node):
        return False
    owner = parent.value
    return (isinstance(owner, ast.Name) and owner.id == "group") or (
        isinstance(owner, ast.Subscript) and ast.unparse(owner.value).endswith("param_groups"))


def parameter_literals(source: str) -> list[tuple[int, str]]:
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    return sorted((node.lineno, node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in PARAMETER_NAMES
                  and not _torch_key(node, parents))


def test_no_module_but_space_spells_a_parameter_name():
    found = {path.name: hits for path in sorted([*BENCH.glob("*.py"), *SCRIPTS.glob("*.py")]) if path.name != "space.py"
             if (hits := parameter_literals(path.read_text()))}
    assert found == {}, "read these from bench.space (the declaration) instead of spelling them: " + repr(found)


def test_the_scan_finds_what_it_forbids():
    hits = parameter_literals('cfg = {"dropout": 0.1}\nkeep = ("width", "lr")\ngroup["lr"] = 1.0\nx = config["lr"]\n'
                              'y = opt.param_groups[0]["lr"]\nz = my_group["lr"]\n')
    assert hits == [(1, "dropout"), (2, "lr"), (2, "width"), (4, "lr"), (6, "lr")]
