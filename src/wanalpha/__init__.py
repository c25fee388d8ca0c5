"""wanalpha: transparent (RGBA) video with diffusion models (Wan-Alpha on Wan2.1)."""

__version__ = "0.1.0"
