"""The HTML docs render math offline: MathJax is served from the build, and no page loads from the web."""

from __future__ import annotations

import configparser
import importlib.util
import logging
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

pytest.importorskip("sphinx")

ROOT = Path(__file__).resolve().parents[1]


def _conf() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_gpderiv_docs_conf", ROOT / "docs" / "conf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(tmp_path: Path, head: str, mathjax: bool = True) -> SimpleNamespace:
    """A fake HTML build: one page with ``head``, and the local MathJax unless ``mathjax`` is False."""
    (tmp_path / "index.html").write_text(f"<html><head>{head}</head><body>$x$</body></html>", encoding="utf-8")
    if mathjax:
        script = tmp_path / "_static" / "mathjax" / "tex-chtml.js"
        script.parent.mkdir(parents=True)
        script.write_text("// MathJax", encoding="utf-8")
    return SimpleNamespace(outdir=str(tmp_path), builder=SimpleNamespace(format="html"))


def test_mathjax_is_local_and_in_the_docs_extra():
    conf = _conf()
    assert "sphinx-mathjax-offline" in conf.extensions and "sphinx.ext.mathjax" in conf.extensions
    assert not conf.mathjax_path.startswith(("http:", "https:", "//"))
    extras = configparser.ConfigParser()
    extras.read(ROOT / "setup.cfg")
    assert "sphinx-mathjax-offline" in extras["options.extras_require"]["docs"].split()


def test_check_offline_accepts_local_pages(tmp_path, caplog):
    conf = _conf()
    app = _build(tmp_path, '<script defer src="_static/mathjax/tex-chtml.js"></script><link href="_static/a.css">')
    with caplog.at_level(logging.WARNING):
        conf.check_offline(app, None)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    "head",
    [
        '<script defer src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"></script>',
        "<script src='//cdn.example.org/x.js'></script>",
        '<link rel="stylesheet" href="http://fonts.example.org/a.css">',
    ],
)
def test_check_offline_flags_pages_that_load_from_the_web(tmp_path, caplog, head):
    conf = _conf()
    with caplog.at_level(logging.WARNING):
        conf.check_offline(_build(tmp_path, head), None)
    assert any("index.html loads from the web" in r.getMessage() for r in caplog.records)


def test_check_offline_flags_missing_mathjax(tmp_path, caplog):
    conf = _conf()
    with caplog.at_level(logging.WARNING):
        conf.check_offline(_build(tmp_path, "", mathjax=False), None)
    assert any("MathJax is missing" in r.getMessage() for r in caplog.records)
