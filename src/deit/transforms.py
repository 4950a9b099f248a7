"""Moved to `deit.data.host` (decode, crops, flips, the train and eval transforms) and
`deit.data.randaugment` (RandAugment); this module re-exports them for one release."""

from deit.data import host
from deit.data.host import *  # noqa: F403 -- the moved names, as `host.__all__` lists them

__all__ = host.__all__
