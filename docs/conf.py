"""Sphinx configuration of the gpderiv documentation (built by ``make docs``).

The build is offline: no intersphinx, nothing is downloaded. The pages are offline too: MathJax 3
comes from the pip package ``sphinx-mathjax-offline`` (the ``docs`` extra), which copies it into
the build's ``_static/mathjax``, so formulas render with no network and no LaTeX installation;
:func:`check_offline` fails the ``-W`` build if a page loads a script or style sheet from the web.

The figures of the examples are not tracked by git (``examples/output/`` is ignored), so the
build makes them: before reading any page it runs each example in :data:`EXAMPLES` (the full
run, about 30 s for all of them on 2 cores) whenever its figure is missing, older than the
example script or the package sources, or was not written by a previous docs build (e.g. a
``--smoke`` run). Set ``GPDERIV_DOCS_SKIP_EXAMPLES=1`` to skip this while editing the docs
(pages whose figure is missing then fail the ``-W`` build).
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import time
from pathlib import Path

from sphinx.errors import SphinxError
from sphinx.util import logging

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # the package, also when it is not installed

import gpderiv  # noqa: E402

logger = logging.getLogger(__name__)

# -- Project -------------------------------------------------------------------------------
project = "gpderiv"
author = "gpderiv developers"
copyright = "gpderiv developers, MIT licence"
version = release = gpderiv.__version__

# -- General -------------------------------------------------------------------------------
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
    # MathJax served from the build itself (copied to _static/mathjax), not from a CDN.
    "sphinx-mathjax-offline",
]
mathjax_path = "mathjax/tex-chtml.js"
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
nitpicky = False
pygments_style = "sphinx"
# The Markdown pages use `code` for code, as does the rest of the project.
default_role = "code"

# -- MyST (the Markdown pages) --------------------------------------------------------------
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

# -- autodoc / napoleon ----------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_class_signature = "mixed"
autodoc_default_options = {"show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" as :ivar: fields, so they do not clash with autodoc's entries for the same names.
napoleon_use_ivar = True
napoleon_use_rtype = False

# -- HTML -------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"gpderiv {release}"
html_static_path: list[str] = []
html_show_sourcelink = False

# -- Figures of the examples ----------------------------------------------------------------------
#: Examples whose figure ``examples/output/<name>.png`` the docs show.
EXAMPLES = ("quickstart_1d", "franke_2d", "noisy_derivatives")
FIGURES = ROOT / "examples" / "output"
#: mtimes of the figures written by the last docs build (so a ``--smoke`` figure is not shown).
STAMP = DOCS / "_build" / "example_figures.json"


class ExampleError(SphinxError):
    """An example script failed while making its figure for the docs."""

    category = "Example failed"


def _newest_source(script: Path) -> float:
    sources = [script, *(ROOT / "gpderiv").rglob("*.py")]
    return max(p.stat().st_mtime for p in sources)


def make_example_figures(app: object | None = None) -> None:
    """Run the examples whose figures are missing or stale (full runs, headless)."""
    if os.environ.get("GPDERIV_DOCS_SKIP_EXAMPLES") == "1":
        return
    stamp = json.loads(STAMP.read_text()) if STAMP.is_file() else {}
    # The examples import this source tree (as the API pages do), headless.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": path}
    for name in EXAMPLES:
        script = ROOT / "examples" / f"{name}.py"
        png = FIGURES / f"{name}.png"
        if (
            png.is_file()
            and stamp.get(name) == png.stat().st_mtime_ns
            and png.stat().st_mtime >= _newest_source(script)
        ):
            continue
        start = time.perf_counter()
        run = subprocess.run(
            [sys.executable, str(script), "--out", str(FIGURES)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        if run.returncode != 0 or not png.is_file():
            tail = "\n".join((run.stdout + run.stderr).splitlines()[-30:])
            raise ExampleError(f"examples/{name}.py failed (exit {run.returncode}) or wrote no {png}:\n{tail}")
        print(f"gpderiv docs: ran examples/{name}.py in {time.perf_counter() - start:.1f} s -> {png}")
        stamp[name] = png.stat().st_mtime_ns
        STAMP.parent.mkdir(parents=True, exist_ok=True)
        STAMP.write_text(json.dumps(stamp, indent=1))


# -- Every public name is documented -----------------------------------------------------------
def _public_modules() -> list[str]:
    """``gpderiv`` and its submodules, except private ones (``_validation``) and ``__main__``."""
    names = ["gpderiv"]
    for info in pkgutil.walk_packages(gpderiv.__path__, "gpderiv."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


def check_public_names(app: object, env: object) -> None:
    """Warn (an error under ``-W``) for each name in a public ``__all__`` that the docs lack.

    A name counts as documented when some documented Python object of the same name is the same
    object, e.g. ``gpderiv.kernels.derivative_rbf_kernel.DerivativeRBFKernel`` documented as
    ``gpderiv.kernels.DerivativeRBFKernel``. Dunder names (``__version__``) are exempt.
    """
    documented: dict[str, list[str]] = {}
    for fullname in env.get_domain("py").objects:
        module, _, name = fullname.rpartition(".")
        documented.setdefault(name, []).append(module)
    for modname in _public_modules():
        module = importlib.import_module(modname)
        for name in getattr(module, "__all__", ()):
            if name.startswith("__"):
                continue
            obj = getattr(module, name)
            if not any(
                where in sys.modules and getattr(sys.modules[where], name, _MISSING) is obj
                for where in documented.get(name, ())
            ):
                logger.warning(f"{modname}.{name} is in {modname}.__all__ but not documented (add it to docs/api.rst)")


_MISSING = object()

#: A ``<script src=...>`` or ``<link href=...>`` that the browser would fetch from the web.
_REMOTE = re.compile(r"""<(?:script|link)\b[^>]*\b(?:src|href)=["'](?:https?:)?//""", re.IGNORECASE)


def check_offline(app: object, exception: Exception | None) -> None:
    """Warn (an error under ``-W``) for each HTML page that loads a script or style sheet from the web."""
    if exception is not None or app.builder.format != "html":
        return
    mathjax = Path(app.outdir) / "_static" / mathjax_path
    if not mathjax.is_file():
        logger.warning(f"MathJax is missing from the build ({mathjax}): formulas would not render offline")
    for page in sorted(Path(app.outdir).rglob("*.html")):
        match = _REMOTE.search(page.read_text(encoding="utf-8"))
        if match:
            logger.warning(f"{page.relative_to(app.outdir)} loads from the web: {match.group(0)}")


def setup(app: object) -> None:
    app.connect("builder-inited", make_example_figures)
    app.connect("env-check-consistency", check_public_names)
    # After sphinx-mathjax-offline's handler (priority 500), which copies MathJax into the build.
    app.connect("build-finished", check_offline, priority=900)
