"""ambassador: a sidecar that calls outside HTTP APIs for the application next to it."""

__version__ = "0.1.0"
