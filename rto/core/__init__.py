"""The algorithm as pure tensor functions: rewards -> advantages -> losses, and their registries.

Imports only torch (and itself): no models, no files, no processes. Everything else may import it.
"""
