"""liveavatar: the library (models, loading, sampling, streaming generators, offline generation)."""

from liveavatar.version import package_version

__version__ = package_version()
