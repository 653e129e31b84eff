"""Shared basics every layer uses: Volume, UserError, atomic writes, progress, device selection, resources."""
