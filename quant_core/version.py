"""The package version, in one place (the header of every written file carries it)."""
__version__ = "0.1.0"
