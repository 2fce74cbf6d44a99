"""Built-in stages; importing this package registers them."""

from . import moe, prune  # noqa: F401
