"""Adapter fine-tuning (LoRA / QLoRA with TRL's SFTTrainer); no Dagster."""
