"""Kluis: end-to-end encrypted messaging whose server holds nothing worth seizing."""

__version__ = "0.1.0"
