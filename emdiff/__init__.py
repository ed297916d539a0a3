"""emdiff: explain emergent misalignment with sparse-dictionary features."""

__version__ = "0.1.0"
