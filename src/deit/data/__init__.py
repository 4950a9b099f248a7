"""Data: where images come from and the host pipeline that turns them into batches.

- `config`: `DataConfig`, the one place for data settings.
- `sources`: the record-source interface, in-memory arrays and the built-in digits.
- `index`: ImageFolder listing through a cached index (`FolderSource`).
- `shards`: ArrayRecord shards, packed from a folder and read back (`ShardSource`).
- `subset`: a stratified labelled fraction of a training split (`Subset`).
- `survey`: a data set's image count and typical size, for the `small` recipe.
- `host`, `randaugment`: the per-image work of grain's workers (decode, crop, flip, RandAugment).
- `device`: the batch ops inside the jitted step (normalise, erasing, mixup/cutmix), their configs.
- `plan`: which records each batch of a run holds (`epoch_order`, `Plan`).
- `batches`: the iterator over a run's batches and its worker processes (`Batches`).
- `pipeline`: what a batch is made of, a run's batches (`run_batches`), `deit data check`.
- `bad_images`: an unreadable image on the loop's side (`take_bad`, `agreed_bad`, `SkippedImages`).
- `gpu`, `device_augment`: `--data.decode gpu` (the workers read bytes, the device decodes).
"""

from deit.data.bad_images import SkippedImages, agreed_bad, take_bad
from deit.data.config import IMAGE_SUFFIXES, DataConfig, cache_home, usable_cores
from deit.data.index import FolderSource, image_folder, index_folder
from deit.data.pipeline import check_images, eval_batches, load_sources, run_batches, train_batches
from deit.data.plan import Plan, epoch_order
from deit.data.shards import ShardSource, open_shards, pack
from deit.data.sources import BadImageError, RecordSource, Source, arrays, digits
from deit.data.subset import Subset, stratified_indices
from deit.data.survey import DataSurvey
from deit.variants import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "BadImageError",
    "DataConfig",
    "DataSurvey",
    "FolderSource",
    "Plan",
    "RecordSource",
    "ShardSource",
    "SkippedImages",
    "Source",
    "Subset",
    "agreed_bad",
    "arrays",
    "cache_home",
    "check_images",
    "digits",
    "epoch_order",
    "eval_batches",
    "image_folder",
    "index_folder",
    "load_sources",
    "open_shards",
    "pack",
    "run_batches",
    "stratified_indices",
    "take_bad",
    "train_batches",
    "usable_cores",
]
