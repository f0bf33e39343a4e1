"""quantbot: a self-hosted chat bot for 4-bit quantized LLMs."""

__version__ = "0.1.0"
