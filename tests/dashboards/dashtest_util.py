"""Constants shared by the dashboard tests and their conftest (tests import this, never `conftest`)."""

RUN_ID = "tiny-gpt2"
