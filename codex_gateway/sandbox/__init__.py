"""A built-in mock of the Responses API that replays recorded upstream transcripts."""

# The account `serve --sandbox` relays through, and the key it sends: the sandbox checks no
# key, so this one is no secret.
ACCOUNT_NAME = "sandbox"
ACCOUNT_KEY = "sandbox"
