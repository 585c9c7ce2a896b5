"""hyla: distil softmax-attention Transformers into fast hybrids, serve them, measure them.

Importing `hyla` registers the hybrid model with transformers' Auto classes.
"""

from hyla.runtime import registry as _registry  # noqa: F401

__version__ = "0.1.0"
