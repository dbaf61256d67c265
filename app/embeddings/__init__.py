"""Textual Inversion embeddings: file formats, the database (hot reload), creating and saving."""
