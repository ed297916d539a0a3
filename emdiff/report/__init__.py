"""Figures and reports of analysis results."""
