"""A1111 prompt syntax: emphasis, BREAK, chunking, prompt editing, and the conditioning encoder."""

from app.prompts.attention import parse_prompt_attention
from app.prompts.schedules import prompt_schedule, text_at_step

__all__ = ["parse_prompt_attention", "prompt_schedule", "text_at_step"]
