"""Image datasets as in-memory uint8 tensors: torchvision's CIFAR, ImageFolder trees, Tiny ImageNet, ImageNet, archives.

Everything is decoded once into ``(N, 3, H, W)`` uint8 (60,000 CIFAR images are 184 MB) and kept in memory;
augmentation happens later on whole batches (see ``patches``), never per image in a DataLoader.

:func:`load_images` gives every image of a source with its relative file name (what ``empssl embed`` embeds);
:func:`load_data` gives its (train, test) splits; both decode with a process pool into one cache under
``data_dir``. A streamed tier builds on :func:`scan` (a source's :class:`Catalog`, nothing decoded; records read
under the same checks) and :func:`decode_image` (the same decoding rules). One module per step: :mod:`.sources`
(files and archives, read safely), :mod:`.layouts` and :mod:`.imagenet` (a tree -> a labelled catalog),
:mod:`.decode`, :mod:`.cache`, and :mod:`.load`, the pipeline.
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
