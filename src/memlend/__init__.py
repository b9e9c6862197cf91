"""memlend: a user-space, two-level file cache that pools the idle memory of VMs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("memlend")  # pyproject.toml is the one place it is written
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
