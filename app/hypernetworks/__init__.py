"""Hypernetworks: A1111's file format, the modules, the attention processor that applies them, the database."""
