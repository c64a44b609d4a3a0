"""The Open Movie Database (OMDb) for the ambassador, shipped as its own distribution."""

__version__ = "0.1.0"
