"""The package's version, in a module of its own: code inside the package reads it here, never through the facade."""

__version__ = "0.1.0"
