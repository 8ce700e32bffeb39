"""The package version, and which code a result came from, also where there is no git checkout
(an installed wheel, a Docker image).

The version is written once, in pyproject.toml, and read here from the installed package's metadata.
Benchmarks record the commit next to their numbers, so a figure can always be traced to the code that made it.
"""

from __future__ import annotations

import json
import os
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGE = "liveavatar"
UNKNOWN_VERSION = "0+unknown"
"""The version when the package is not installed (a bare checkout on PYTHONPATH): a valid PEP 440
version that sorts below every release."""


def package_version() -> str:
    """pyproject.toml's `version`, as pip installed it (an editable install reads the checkout's)."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return UNKNOWN_VERSION


def source_commit() -> str:
    """The commit of this code: $LIVEAVATAR_COMMIT, else the git checkout the package was imported from,
    else the commit pip recorded when it installed the package from a git URL, else the package version."""
    if os.environ.get("LIVEAVATAR_COMMIT"):
        return os.environ["LIVEAVATAR_COMMIT"]
    return _git_commit(Path(__file__).resolve().parent) or _installed_commit() or _installed_version()


def _git_commit(folder: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _installed_commit() -> str | None:
    """pip writes direct_url.json for `pip install git+https://...@<ref>`, with the resolved commit."""
    try:
        record = metadata.distribution(PACKAGE).read_text("direct_url.json")
        commit = json.loads(record or "{}").get("vcs_info", {}).get("commit_id")
    except (metadata.PackageNotFoundError, ValueError, AttributeError):
        return None
    return str(commit)[:7] if commit else None


def _installed_version() -> str:
    version = package_version()
    return "unknown" if version == UNKNOWN_VERSION else f"{version} (no git checkout)"
