"""minidiff: a small, readable diffusion library that a course builds lecture by lecture."""
from minidiff.utils import append_dims, budget, check_finite, get_device, smoke, smoke_mode

__all__ = ["append_dims", "budget", "check_finite", "get_device", "smoke", "smoke_mode"]
__version__ = "0.1.0"
