"""osproject: a file-integrity checker built as a classic Unix pre-fork server."""

__version__ = "0.2.0"
