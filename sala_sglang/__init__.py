"""sala-sglang: MiniCPM-SALA (sparse + linear hybrid attention) for a stock SGLang."""

__version__ = "0.1.0"
