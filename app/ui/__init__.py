"""Gradio tabs. Thin: read inputs, call a service, show the result; no torch here."""
