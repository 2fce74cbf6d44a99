"""Built-in stages; importing this package registers them."""

from . import attention, moe, prune  # noqa: F401
