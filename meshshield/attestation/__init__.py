"""Evidence parsing and verification, one module per platform."""
