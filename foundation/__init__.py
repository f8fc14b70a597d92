"""Generic helpers below every other package: settings flags, cache locations, a tiny BPE builder.

This layer knows nothing of FIRM, its tasks or its protocol, and imports nothing of ours, so the
server, the RL workers and the training side can all share it without depending on one another.
Its modules need the server extra (pydantic-settings; tokenizers to build a tokenizer), so the
client, which the base install carries alone, never imports them.
"""
