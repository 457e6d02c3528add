"""Names the training CLI offers and the trainer implements, importable without torch (so
that ``python -m grit_models.train --help`` answers at once)."""

LOSS_GEN_TYPES = ("mixed", "token")            # gritlm's loss_gen_type
MODES = ("unified", "embedding", "generative")  # which losses a training run computes
POOLING_METHODS = ("mean", "weightedmean")      # embedding pooling in training
