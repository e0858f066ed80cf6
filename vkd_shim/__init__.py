"""vkd_shim: a vision-KD regularizer for ms-swift's GKD trainer, switched on by environment alone.

This module stays stdlib-only and imports nothing at load time: every Python process that
has the shim installed pays for it, including the ones that never asked for vision KD.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "activate", "deactivate"]


def activate() -> bool:
    """Install the ms-swift post-import hooks in this process, whatever ``VKD_ENABLE`` says.

    For programs that opt in from code instead of the environment. Returns False when the
    shim was already active (a second call never double-wraps).
    """
    from vkd_shim import bootstrap

    return bootstrap.activate()


def deactivate() -> bool:
    """Restore every original that the shim wrapped and stop patching later imports."""
    from vkd_shim import bootstrap

    return bootstrap.deactivate()
