"""Fails when a public name of overparam_optax has no entry in the built API reference.

The public names are every name in ``__all__`` of the package and of each public module
under it (no path component starting with an underscore), and the public modules
themselves. A name has an entry when the site's inventory (``objects.inv``, written by the
HTML build) holds it under its own qualified name, or holds the same function, class or
module under another name (a name the package re-exports is documented once, at
``overparam_optax.<name>``).

Usage, after ``sphinx-build -b html docs docs/_build/html``::

    python docs/api_coverage.py docs/_build/html

Exit status 0 with a one-line summary, or 1 with the missing names, one per line.
"""

import importlib
import inspect
import pathlib
import pkgutil
import sys
import zlib

PACKAGE = "overparam_optax"


def inventory_names(objects_inv: pathlib.Path) -> set[str]:
    """The Python object names of a Sphinx inventory (format version 2)."""
    raw = objects_inv.read_bytes()
    header_lines = 4  # "# Sphinx inventory version 2", project, version, compression note
    header, _, body = raw.partition(b"\n")
    if header.strip() != b"# Sphinx inventory version 2":
        raise ValueError(f"{objects_inv}: not a version-2 Sphinx inventory ({header!r})")
    for _ in range(header_lines - 1):
        _, _, body = body.partition(b"\n")
    names = set()
    for line in zlib.decompress(body).decode().splitlines():
        name, role = line.split(" ", 2)[:2]
        if role.startswith("py:"):
            names.add(name)
    return names


def public_modules(package: str = PACKAGE) -> list[str]:
    """The package and every module below it with no component starting with "_"."""
    root = importlib.import_module(package)
    names = [package]
    for info in pkgutil.walk_packages(root.__path__, f"{package}."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


def public_names(modules: list[str]) -> dict[str, object]:
    """Qualified name -> object, for each module and each name in a module's __all__."""
    names = {}
    for module_name in modules:
        module = importlib.import_module(module_name)
        names[module_name] = module
        for name in getattr(module, "__all__", ()):
            names[f"{module_name}.{name}"] = getattr(module, name)
    return names


def _resolve(qualified: str):
    """The object a documented name refers to, or None when it does not import."""
    parts = qualified.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attribute in parts[split:]:
                obj = getattr(obj, attribute)
        except AttributeError:
            return None
        return obj
    return None


def missing_entries(public: dict[str, object], documented: set[str]) -> list[str]:
    """The public names without an entry (same name, or the same object documented)."""
    by_identity = {
        id(obj)
        for obj in map(_resolve, documented)
        if inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismodule(obj)
    }
    missing = []
    for name, obj in sorted(public.items()):
        if name in documented:
            continue
        identifiable = inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismodule(obj)
        if identifiable and id(obj) in by_identity:
            continue
        missing.append(name)
    return missing


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: python {argv[0]} <html build folder>", file=sys.stderr)
        return 2
    objects_inv = pathlib.Path(argv[1]) / "objects.inv"
    if not objects_inv.is_file():
        print(f"{objects_inv} not found: build the HTML site first", file=sys.stderr)
        return 2
    public = public_names(public_modules())
    missing = missing_entries(public, inventory_names(objects_inv))
    if missing:
        print(f"{len(missing)} public names have no entry in the API reference (docs/api/):")
        print("\n".join(f"  {name}" for name in missing))
        return 1
    print(f"API coverage: all {len(public)} public names of {PACKAGE} have an entry.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
