"""The package's imports follow the layers of the style guide: read from the source (ast), not from a running process.

```
4 face        config, config_parsing, recipe, cli, commands, outputs, tables, flower_app
3 transports  transports/: accelerate, hub/, flower/  never each other
2 protocol    trainer (local steps), client, client_state, evaluation, server (server step), algorithms/
1 pieces      strategies, aggregation, ranks, data/, embedded/, metrics/, adapters, model
0 model       configuration_comigs, layer_comigs, experts_comigs, checkpoint_comigs, modeling_comigs: travel
              with saved models
```
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "comigs_hf"
LAYERS = {
    "configuration_comigs": 0,
    "checkpoint_comigs": 0,
    "experts_comigs": 0,
    "layer_comigs": 0,
    "modeling_comigs": 0,
    "strategies": 1,
    "aggregation": 1,
    "ranks": 1,
    "data": 1,
    "embedded": 1,
    "metrics": 1,
    "adapters": 1,
    "model": 1,
    "trainer": 2,
    "client": 2,
    "client_state": 2,
    "algorithms": 2,
    "evaluation": 2,
    "server": 2,
    "transports": 3,
    "transports.accelerate": 3,
    "transports.hub": 3,
    "transports.flower": 3,
    "config": 4,
    "config_parsing": 4,
    "commands": 4,
    "recipe": 4,
    "cli": 4,
    "outputs": 4,
    "tables": 4,
    "flower_app": 4,
}
TRANSPORTS = {"transports.accelerate", "transports.hub", "transports.flower"}
REMOTE_CODE = {"configuration_comigs", "checkpoint_comigs", "experts_comigs", "layer_comigs", "modeling_comigs"}
# what a model loaded with trust_remote_code may import: transformers' own model files import huggingface_hub
# (`huggingface_hub.dataclasses.strict`), a hard dependency of transformers
REMOTE_CODE_LIBRARIES = {"torch", "transformers", "safetensors", "huggingface_hub"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def unit(module: str) -> str | None:
    """The layered unit of a package module: `comigs_hf.data.loading` -> `data`, each transport its own
    (`comigs_hf.transports.hub.client` -> `transports.hub`); `None` for the package itself."""
    parts = module.split(".")
    if len(parts) > 2 and parts[1] == "transports":
        return f"transports.{parts[2]}"
    return parts[1] if len(parts) > 1 else None


def imports(module: str) -> list[tuple[str, int]]:
    """`(imported module, line)` for every import in `module`, relative ones resolved (function-level ones too)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((target, node.lineno))
            # `from . import x` and `from .pkg import sub` may name modules
            found += [
                (f"{target}.{alias.name}", node.lineno) for alias in node.names if f"{target}.{alias.name}" in MODULES
            ]
    return found


def internal_edges() -> list[tuple[str, str, int]]:
    edges = []
    for module in MODULES:
        for target, line in imports(module):
            if target == "comigs_hf" or target.startswith("comigs_hf."):
                edges.append((module, target, line))
    return edges


def test_every_module_has_a_layer():
    assert {unit(m) for m in MODULES} - {None} <= set(LAYERS)


@pytest.mark.parametrize("edge", internal_edges(), ids=lambda e: f"{e[0]}->{e[1]}")
def test_no_module_imports_from_a_layer_above_it_nor_one_transport_from_another(edge):
    source, target, line = edge
    if unit(source) is None or unit(target) is None or unit(source) == unit(target):
        return  # the package's __init__ registers the model; a unit's own files import each other
    source_layer, target_layer = LAYERS[unit(source)], LAYERS[unit(target)]
    assert target_layer <= source_layer, f"{source}:{line} (layer {source_layer}) imports {target} ({target_layer})"
    assert not (unit(source) in TRANSPORTS and unit(target) in TRANSPORTS), f"{source}:{line} imports {target}"


def module_level_lines(module: str) -> set[int]:
    """Lines of the imports that run when `module` is imported (not inside a function)."""
    tree = ast.parse(MODULES[module].read_text())
    nested = {
        node.lineno
        for function in ast.walk(tree)
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(function)
        if isinstance(node, (ast.Import, ast.ImportFrom))
    }
    return {node.lineno for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))} - nested


def test_the_package_root_imports_only_the_model_layer():
    # `import comigs_hf` registers the model and nothing else; a function of the root (the embedded base's resolver,
    # run when a checkpoint names that base) may import a piece of layer 1 when it is called
    root = [(unit(target), line) for source, target, line in internal_edges() if unit(source) is None]
    at_import = module_level_lines("comigs_hf")
    assert {target for target, line in root if line in at_import} <= REMOTE_CODE
    assert all(LAYERS[target] <= 1 for target, line in root if line not in at_import)


def test_the_module_graph_has_no_cycle():
    graph: dict[str, set[str]] = {}
    for source, target, _ in internal_edges():
        target = target if target in MODULES else target.rsplit(".", 1)[0]
        if source != target:
            graph.setdefault(source, set()).add(target)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for child in graph.get(node, ()):
            if state.get(child) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*path, node, child])}")
            if state.get(child) is None:
                visit(child, [*path, node])
        state[node] = 2

    for node in list(graph):
        if node not in state:
            visit(node, [])


@pytest.mark.parametrize("name", sorted(REMOTE_CODE))
def test_remote_code_imports_only_what_a_remote_loader_has_and_nothing_by_string(name):
    module = f"comigs_hf.{name}"
    for target, line in imports(module):
        top = target.split(".")[0]
        if top == "comigs_hf":
            assert unit(target) in REMOTE_CODE, f"{module}:{line} imports {target}"
        else:
            assert top in sys.stdlib_module_names or top in REMOTE_CODE_LIBRARIES, f"{module}:{line} imports {target}"
    tree = ast.parse(MODULES[module].read_text())
    for node in ast.walk(tree):
        # torch's registries of hooks on every module (`torch.nn.modules.module._global_forward_hooks`) are private
        names = [node.attr] if isinstance(node, ast.Attribute) else []
        names += [node.value] if isinstance(node, ast.Constant) else []
        assert not any(str(name).startswith("_global_") for name in names), f"{module}:{node.lineno} reads {names}"
        if isinstance(node, ast.Call):
            called = ast.unparse(node.func)
            assert called not in ("importlib.import_module", "__import__", "import_module"), (
                f"{module}:{node.lineno} imports by string: {called}"
            )
        assert not (isinstance(node, ast.alias) and node.name == "importlib"), f"{module} imports importlib"


def test_a_forbidden_edge_is_caught():
    # the checks above must be able to fail: a transport importing the face is refused
    assert LAYERS["transports.accelerate"] < LAYERS["config"]
    with pytest.raises(AssertionError, match="imports comigs_hf.config"):
        test_no_module_imports_from_a_layer_above_it_nor_one_transport_from_another(
            ("comigs_hf.transports.accelerate", "comigs_hf.config", 1)
        )
    with pytest.raises(AssertionError, match="imports comigs_hf.transports.hub.client"):
        test_no_module_imports_from_a_layer_above_it_nor_one_transport_from_another(
            ("comigs_hf.transports.accelerate", "comigs_hf.transports.hub.client", 1)
        )


MAX_MODULE_LINES = 500  # a module past this is two concepts (the style guide): split it along them


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_passes_500_lines(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{module} has {lines} lines: split it along its concepts"
