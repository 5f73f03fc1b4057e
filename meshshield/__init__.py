"""meshshield: a service mesh for confidential computing."""

__version__ = "0.1.0"
