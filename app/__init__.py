"""sd-personalize-webui: a Stable Diffusion web UI for Textual Inversion and hypernetworks."""

__version__ = "0.1.0"
