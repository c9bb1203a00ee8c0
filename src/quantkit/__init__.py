"""quantkit: fit language models to the hardware you have."""

__version__ = "0.1.0"
