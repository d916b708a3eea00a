"""Item tokenizers: content embeddings and semantic ids."""
