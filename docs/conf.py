"""Sphinx configuration of the overparam_optax site (build command: CONTRIBUTING.md).

The API reference is generated from the docstrings (autodoc + autosummary, Google style
through napoleon); the guides are MyST markdown. ``api_coverage.py`` checks afterwards that
every public name has an entry.
"""

import importlib
import inspect
import pathlib
import sys

# The checkout's package (also when it is not installed), and api_coverage beside this file.
_DOCS = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(_DOCS.parent), str(_DOCS)]

from api_coverage import public_modules  # noqa: E402

import overparam_optax  # noqa: E402

project = "overparam_optax"
author = "the overparam_optax authors"
copyright = "2026, the overparam_optax authors"
version = release = overparam_optax.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",
    # MathJax from the docs extra's wheel, copied into _static/: no CDN, pages render math
    # offline (it sets mathjax_path to _static/mathjax/tex-chtml.js).
    "sphinx-mathjax-offline",
]

exclude_patterns = ["_build"]
templates_path = ["_templates"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}

# Warnings are errors in CI (-W): every internal cross-reference must resolve. References
# to the libraries we build on are not checked (their inventories would need the network).
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jaxlib|optax|flax|numpy|np|jnp|chex|orbax|matplotlib|absl)(\..*)?"),
    (r"py:.*", r"(collections\.abc|typing|types|pathlib|argparse|os|dataclasses)\..*"),
]

# -- API reference ---------------------------------------------------------------------
autosummary_generate = True
autosummary_ignore_module_all = False  # a module's public names are its __all__
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
maximum_signature_line_length = 88  # longer signatures: one parameter per line
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False


def _reexported():
    """Submodule names that are the objects the package exports at its top level.

    Their entries live at ``overparam_optax.<name>``; the module pages link to them
    instead of documenting them a second time.
    """
    top = {id(getattr(overparam_optax, n)): n for n in overparam_optax.__all__}
    names = {}
    for module_name in public_modules()[1:]:  # the submodules, not the package
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and id(obj) in top:
                names[f"{module_name}.{name}"] = f"overparam_optax.{top[id(obj)]}"
    return names


autosummary_context = {"reexported": _reexported()}

# -- Doctest: the >>> examples of every documented docstring ---------------------------
doctest_test_doctest_blocks = "default"
doctest_global_setup = """
import jax
import jax.numpy as jnp
import numpy as np
import optax
import overparam_optax as opx
"""



def _doctest_in_module_namespace(app, what, name, obj, options, lines):
    """Runs a docstring's >>> examples in its module's namespace, as doctest.testmod does.

    The examples use their module's names unqualified (``run_full_batch(...)`` in
    training.py); a hidden testsetup gives the page's doctest group those names.
    """
    if not any(line.lstrip().startswith(">>>") for line in lines):
        return
    module = name if what == "module" else getattr(obj, "__module__", None)
    if not module or not module.startswith("overparam_optax"):
        return
    lines[:0] = [
        ".. testsetup::",
        "",
        "   import importlib",
        f"   globals().update(vars(importlib.import_module({module!r})))",
        "",
    ]


# -- Markdown guides ---------------------------------------------------------------------
myst_enable_extensions = ["amsmath", "dollarmath", "colon_fence"]
myst_heading_anchors = 4  # [text](page.md#a-heading) links resolve, and are checked

# -- HTML --------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"overparam_optax {release}"
html_theme_options = {
    "show_toc_level": 2,
    "home_page_in_toc": True,
}
html_static_path = []

# -- Pages that work in progress adds ---------------------------------------------------
# Listed in index.md's toctree, and dropped from it while their file does not exist yet
# (a toctree entry without a document is a warning, so an error under -W).
OPTIONAL_PAGES = ("implicit_regularization",)


def _drop_missing_optional_pages(app, docname, source):
    if docname != "index":
        return
    for page in OPTIONAL_PAGES:
        if not any((pathlib.Path(app.srcdir) / f"{page}{s}").exists() for s in source_suffix):
            source[0] = source[0].replace(f"\n{page}\n", "\n")


# -- Unqualified names in docstrings ---------------------------------------------------
# A docstring names its module's siblings unqualified (":func:`collapse`" in factorized.py).
# The names the package re-exports have their entry at overparam_optax.<name>, not in the
# defining module, so such a reference is resolved to the one documented object with that
# last name component. Anything still unresolved (no such object, or several) stays a
# warning, so an error under -W.
def _resolve_unqualified(app, env, node, contnode):
    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or "." in target:
        return None
    domain = env.get_domain("py")
    matches = [
        name
        for name, entry in domain.objects.items()
        if name.rsplit(".", 1)[-1] == target and not entry.aliased  # not a :canonical: alias
    ]
    if len(matches) != 1:
        return None
    return domain.resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], matches[0], node, contnode
    )


def setup(app):
    app.connect("source-read", _drop_missing_optional_pages)
    app.connect("missing-reference", _resolve_unqualified)
    app.connect("autodoc-process-docstring", _doctest_in_module_namespace)
