"""medray: self-supervised medical image embeddings, similarity search and classifiers on Ray."""

__version__ = "0.1.0"
