"""The hybrid model, its ops, cache management and the serving engine."""
