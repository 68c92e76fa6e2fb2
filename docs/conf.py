"""Sphinx configuration for the pyshrinker docs (built with warnings as errors in CI)."""

from __future__ import annotations

project = "pyshrinker"
author = "the pyshrinker developers"
copyright = "2026, the pyshrinker developers"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
exclude_patterns = ["_build", "systemd/*.service", "*.service"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
# Optional extras the reference documents without requiring them at build time.
autodoc_mock_imports = ["mfusepy", "prometheus_client", "matplotlib"]
# attrs-generated and re-exported members make duplicate targets; the reference keeps one copy.
suppress_warnings = ["myst.header"]
nitpicky = False

html_theme = "alabaster"
html_title = "pyshrinker"
