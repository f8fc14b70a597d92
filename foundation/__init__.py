"""Generic helpers below every other package: settings flags, cache locations, a tiny BPE builder.

This layer knows nothing of FIRM, its tasks or its protocol, and imports nothing of ours, so the
server, the RL workers and the training side can all share it without depending on one another.
Its modules import pydantic-settings and tokenizers (the server extra), never the base install's
client, which does not use them.
"""
