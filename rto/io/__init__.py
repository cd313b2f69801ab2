"""What users hand in: settings (YAML, flags, TRL configs) into checked dataclasses, data files and
datasets into rows, a user's plugins by name, and `UserError`, the one-line error.

Imports nothing of rto but `rto.__version__`; every other room may import it.
"""
