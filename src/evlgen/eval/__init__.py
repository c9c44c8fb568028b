"""Evaluation: caption metrics (coco-caption), VQA accuracy (official VQAv2 rule) and generation runners."""
