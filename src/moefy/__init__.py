"""moefy: turn the activation sparsity of Transformer FFNs into cheaper, faster inference."""

__version__ = "0.1.0"
