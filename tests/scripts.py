"""Loading the repository's scripts (benchmarks/, examples/) as modules, for their tests."""

import importlib.util
import pathlib
import sys
import types

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_script(relative_path: str, name: str | None = None) -> types.ModuleType:
    """Executes ``REPO/relative_path`` as a module named ``name`` (default: the file's stem).

    The module is registered in ``sys.modules`` (flax's dataclasses look their module up
    there); a later load of the same name replaces it.
    """
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
