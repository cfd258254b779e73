"""empssl: EMP-SSL (Extreme-Multi-Patch Self-Supervised Learning) pretraining and evaluation, with SimCLR, VICReg
and BYOL in the same harness.

Public API (import what you need; nothing heavy happens at import time)::

    from empssl.config import Config              # the recipe, defaults = the paper's CIFAR-10 settings
    from empssl.data import load_data, load_images  # (train, test) uint8 image tensors; every image of a folder
    from empssl.patches import Augment, make_patches
    from empssl.models import EMPSSLModel
    from empssl.methods import create_method      # emp-ssl | simclr | vicreg | byol: model, views, loss
    from empssl.losses import total_coding_rate, emp_ssl_loss, simclr_loss, vicreg_loss, byol_loss
    from empssl.optim import LARS, lr_at
    from empssl.train import train
    from empssl.evaluate import evaluate, image_features, extract_features, knn_predict
    from empssl.probe import linear_probe
    from empssl.checkpoint import load_checkpoint
    from empssl.embed import embed
    from empssl.export import export_backbone
    from empssl.compare import compare
"""

__version__ = "0.2.0"
