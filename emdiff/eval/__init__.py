"""Evaluation: sample answers from a model (± adapter), judge them, and measure EM rates."""
