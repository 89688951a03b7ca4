"""A small CNN on Fashion-MNIST: a quick classifier, and the feature extractor that the diffusion
experiments use for a Frechet distance and class-conditional accuracy of generated images.

Train (2 stages of 2 3x3 convs (32, 64 channels) + max-pool, a 128-wide feature layer; ~0.47M
params):
    python -m research.launch --config configs/cnn_fashion_mnist.py --workdir workdirs/cnn_fmnist
A run of seconds:
    python -m research.launch --config configs/cnn_fashion_mnist.py:smoke --workdir /tmp/cnn_smoke
Reuse the trained classifier (logits and 128-d features of uint8 images):
    from research.tasks.classify import load_classifier
    clf = load_classifier("workdirs/cnn_fmnist"); feats = clf.features(images_uint8)
"""
import ml_collections

from research.core.config import parse_arg, sibling_config


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False)
    c = sibling_config(__file__, "vit_fashion_mnist").get_config("smoke" if arg.smoke else None)
    c.model = ml_collections.ConfigDict(dict(
        name="cnn", image_size=28, channels=1, widths=(32, 64), hidden=128, dropout=0.3,
        num_classes=10))
    c.data.flip = True
    c.data.crop_pad = 0
    if arg.smoke:
        c.model.update(widths=(4, 8), hidden=16)
        return c
    c.total_steps = 3000   # ~6.4 epochs
    c.optim.update(lr=1e-3, warmup_steps=100, decay_steps=c.total_steps, weight_decay=0.01)
    return c
