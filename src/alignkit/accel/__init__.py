"""How fast: the acceleration backends (`plain`, `cpu`) behind one interface (`alignkit.accel.backend`)."""

from alignkit.accel.backend import ACCEL_CHOICES, Backend, resolve

__all__ = ["ACCEL_CHOICES", "Backend", "resolve"]
