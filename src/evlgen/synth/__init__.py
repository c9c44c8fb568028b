"""The synthetic world: procedural scenes, captions, questions, clips, and tiny backbones trained on them."""
