"""hyla: distil softmax-attention Transformers into fast hybrids, serve them, measure them.

Importing `hyla` is light: it imports neither torch nor transformers. The hybrid model registers
itself with transformers' Auto classes when those load (see `hyla.hf_auto`), so
`AutoModelForCausalLM.from_pretrained(converted_dir)` works after `import hyla`.
"""

from hyla.hf_auto import install as _install_hf_auto

_install_hf_auto()

__version__ = "0.1.0"
