"""Conversion of a softmax-attention teacher into a hybrid (RADLADS + KL-guided layer selection)."""
