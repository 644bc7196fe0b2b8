"""raymed: fine-tune and serve a medical-assistant language model, scaled with Ray."""

from raymed.errors import RaymedError

__all__ = ["RaymedError"]
__version__ = "0.1.0"
