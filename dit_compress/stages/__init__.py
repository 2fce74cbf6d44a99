"""Built-in stages; importing this package registers them."""

from . import prune  # noqa: F401
