"""kdump-harness: does in-flight DMA corrupt memory when a kernel panics into kdump?"""

__version__ = "0.1.0"
