"""Constants shared by the dashboard tests and their conftest (tests import this, never `conftest`)."""

RUN_ID = "tiny-gpt2"
HEADS_ID = "tiny-heads"
"""A run of the same tiny GPT-2 holding `blocks.*.attn.pattern` per token (pooling none)."""
