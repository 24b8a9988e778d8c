"""The version of cipherpool, apart from the package's ``__init__`` (which imports the
clients): any module may read it without importing the package's public surface."""

__version__ = "0.8.0"
