"""Runs of many stages and what they report: `rto pipeline`, `rto tune`, `rto reproduce`, the
results tables, figures and seed statistics.

Runs stages in child processes and reads their files; imports any room below it, never cli/api.
"""
