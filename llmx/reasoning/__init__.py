"""NaturalReasoning (Yuan et al., 2025, arXiv 2502.13124): questions with reference answers backtranslated from
documents, deduplicated and decontaminated, answered by a teacher, then used for distillation and self-training.

Plain Python (and PyTorch where a model is trained or scored), usable without the launcher; the recipe that runs
the stages in order is llmx.recipes.synthesize."""
