"""Built-in stages; importing this package registers them."""

from . import attention, mob, moe, prune, recover  # noqa: F401
