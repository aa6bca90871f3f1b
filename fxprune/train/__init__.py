"""Training helpers for pruned models: limited-data fine-tuning (:mod:`.finetune`)."""
