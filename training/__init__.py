"""Training side of the FIRM reward server: data curation, critic fine-tuning, FIRM-Bench evaluation.

`training.curation` turns raw pairs into supervised fine-tuning records, `training.finetune`
trains a Qwen3-VL critic on them, `training.bench` measures a served critic against human scores.
Every record is rendered by the server's own judges, so what a critic learns is what it is asked.
"""
