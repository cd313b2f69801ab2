"""The algorithm as pure tensor functions: rewards -> advantages -> losses. No models, no I/O."""
