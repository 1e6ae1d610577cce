"""fusedata: offline data engineering for knowledge fusion of LLMs."""

__version__ = "0.1.0"
