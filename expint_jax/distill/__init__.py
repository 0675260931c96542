"""Context distillation: divergence losses, teacher/student views, the jitted step, the trainer."""
