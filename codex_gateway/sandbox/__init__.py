"""A built-in mock of the Responses API that replays recorded upstream transcripts."""
