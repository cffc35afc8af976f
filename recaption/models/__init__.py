"""Model code: LLaVA captioners, CLIP scorers, the SDXL teacher and the KOALA student."""
