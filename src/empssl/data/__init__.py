"""Image datasets as in-memory uint8 tensors: torchvision's CIFAR, ImageFolder trees, Tiny ImageNet, archives.

Everything is decoded once into ``(N, 3, H, W)`` uint8 (60,000 CIFAR images are 184 MB) and kept in memory;
augmentation happens later on whole batches (see ``patches``), never per image in a DataLoader.

Two entry points: :func:`load_images` gives every image of a folder, tree, archive or dataset with its relative
file name (what ``empssl embed`` embeds); :func:`load_data` gives its (train, test) splits, which training and
evaluation use. Folders and archives are decoded with a process pool into one cache under ``data_dir``
(``data_dir/cache/<name>-<hash>/``: ``images.npy``, ``labels.npy`` and ``meta.json``) that later calls of
either reuse.

The pipeline is one module per step, each usable alone (docs/ARCHITECTURE.md lists them); a streamed tier takes
the scan and the per-image decoder, and feeds its own batches.

:func:`scan` gives a source's :class:`Catalog` without decoding; ``record.read()`` gives one image's bytes
under the same checks, and :func:`decode_image` decodes them by the same rules as the in-memory tier (a test
holds the two equal). A folder's records hold paths, read when asked; an archive's hold the member bytes,
read in one pass (a streamed tier over an archive larger than memory would list the names in a first pass and
read the members in a second, which :mod:`.sources` does not do yet).

Tiny ImageNet is read as distributed (``tiny-imagenet-200.zip`` or its unpacked folder): ``train/<wnid>/images/``,
``val/images/`` labelled by ``val/val_annotations.txt``, classes from ``wnids.txt`` (sorted), human-readable names
from ``words.txt``; the unlabelled ``test/`` is left out.
"""

from .cache import CACHE_VERSION
from .decode import MAX_IMAGE_PIXELS, decode_image
from .images import DataError, ImageData, ImageSet
from .layouts import TORCHVISION_DATASETS, Catalog, ImageRecord
from .load import TINY_IMAGENET, TINY_IMAGENET_URL, load_data, load_images, scan
from .sources import ARCHIVE_SUFFIXES, IMAGE_EXTENSIONS, MAX_FILE_BYTES, demo_archive

__all__ = [
    "ARCHIVE_SUFFIXES", "CACHE_VERSION", "IMAGE_EXTENSIONS", "MAX_FILE_BYTES", "MAX_IMAGE_PIXELS", "TINY_IMAGENET",
    "TINY_IMAGENET_URL", "TORCHVISION_DATASETS", "Catalog", "DataError", "ImageData", "ImageRecord", "ImageSet",
    "decode_image", "demo_archive", "load_data", "load_images", "scan",
]
