"""liveavatar: the library (models, loading, sampling, streaming generators, offline generation)."""

__version__ = "0.1.0"
