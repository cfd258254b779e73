"""empssl: EMP-SSL (Extreme-Multi-Patch Self-Supervised Learning) pretraining and bag-of-features evaluation.

Public API (import what you need; nothing heavy happens at import time)::

    from empssl.config import Config              # the recipe, defaults = the paper's CIFAR-10 settings
    from empssl.data import load_data             # (train, test) uint8 image tensors
    from empssl.patches import Augment, make_patches
    from empssl.models import EMPSSLModel
    from empssl.losses import total_coding_rate, emp_ssl_loss
    from empssl.optim import LARS, cosine_lr
    from empssl.train import train
    from empssl.evaluate import evaluate, extract_features, linear_probe, knn_predict
    from empssl.checkpoint import load_checkpoint
"""

__version__ = "0.1.0"
