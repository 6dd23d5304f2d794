"""The embedded default demo: a tiny LLaVA on easy-VQA, learning a new task with MiLoRA while forgetting less.

easyvqa:     the easy-VQA package's questions and images as LLaVA conversations + eval question files,
             split into two disjoint task families ("pretrained knowledge" and "new task").
base_model:  stage 0, the toy base model (vision tower, projector alignment, pretrained-knowledge stage).
report:      the results table, results.json and the loss-curve plot of a demo run.
"""
