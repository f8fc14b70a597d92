"""Data curation: raw pairs -> supervised fine-tuning records for a FIRM critic.

`edit` is difference-first (describe what changed, then grade the edit from that description);
`gen` is plan-then-score (a checklist from the prompt, then the image checked item by item).
Both call any OpenAI-compatible endpoint and write records with `training.records`.
"""
