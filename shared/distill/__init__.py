"""FineScope stage 3: self-data distillation (teacher rewrites, the filter) and recovery fine-tuning, in plain torch."""
