"""Photo collections: decoding, scanning, statistics, augmentation, datasets, splits, a demo set.

    decode.py      load_image(path) -> (H, W, 3) uint8 RGB, upright; verify_image
    scan.py        scan_dataset(DIR or CSV) -> DatasetIndex(classes, samples, bad); list_images(DIR)
    stats.py       channel_stats(paths) -> RGB mean/std
    transforms.py  build_transforms(...) -> img -> (3, S, S) float32 tensor; BatchMix (CutMix/mixup)
    datasets.py    PhotoDataset (optional RAM cache), EpochShuffleSampler
    balance.py     ClassBalancedSampler, target_distribution (sqrt / balanced class mix)
    device_augment.py  CanvasDataset (uint8 photos) + DeviceAugment (the training augmentation as batched
                   tensor ops on the training device)
    splits.py      stratified_kfold / stratified_split / save_splits / load_splits
    index.py       the collection index: per photo size, mtime, digest, hash, readability; read once, refreshed
    duplicates.py  perceptual hashes, near_duplicate_pairs (banded above 8,000 photos), group_duplicates
                   (splits keep groups together; look-alike giant groups are dissolved)
    shards.py      write_shards (WebDataset tar shards, split fixed when written), read_shard_info, is_shard_source
    demo.py        make_demo_dataset() -> a small synthetic mineral set for demos and tests
    cli.py         `mineralnet data check|shard|demo`

Every public name is importable from `mineralnet.data`.
"""
from mineralnet.data.decode import ImageDecodeError, load_image, verify_image
from mineralnet.data.decode import _decode_jpeg_fast, _decode_pil, _jpeg_header  # noqa: F401 (tests)
from mineralnet.data.scan import IMAGE_EXTENSIONS, DatasetIndex, identical_groups, list_images, scan_dataset
from mineralnet.data.stats import channel_stats
from mineralnet.data.transforms import (BatchMix, EvalTransform, Transform, TrainTransform, build_transforms,
                                        warp_crop)
from mineralnet.data.datasets import EpochShuffleSampler, ImageDataset, PhotoDataset
from mineralnet.data.device_augment import CanvasDataset, DeviceAugment, RawPhotos
from mineralnet.data.balance import SAMPLING, ClassBalancedSampler, class_counts, target_distribution
from mineralnet.data.splits import (SPLITS_FORMAT, load_splits, save_splits, small_classes, stratified_kfold,
                                    stratified_split)
from mineralnet.data.duplicates import (DEFAULT_MAX_DISTANCE, DEFAULT_MAX_GROUP, DuplicateGroups, collection_groups,
                                        duplicate_groups, false_partner_note, group_duplicates, hash_photos,
                                        near_duplicate_pairs, photo_hash)
from mineralnet.data.index import PhotoFacts, default_index_path, load_index, refresh_index
from mineralnet.data.shards import SHARDS_FORMAT, is_shard_source, read_shard_info, write_shards
from mineralnet.data.demo import DEMO_MINERALS, make_demo_dataset

__all__ = [
    "ImageDecodeError", "load_image", "verify_image",
    "IMAGE_EXTENSIONS", "DatasetIndex", "list_images", "scan_dataset",
    "channel_stats",
    "BatchMix", "EvalTransform", "Transform", "TrainTransform", "build_transforms", "warp_crop",
    "EpochShuffleSampler", "ImageDataset", "PhotoDataset", "identical_groups",
    "CanvasDataset", "DeviceAugment", "RawPhotos",
    "SAMPLING", "ClassBalancedSampler", "class_counts", "target_distribution",
    "SPLITS_FORMAT", "load_splits", "save_splits", "small_classes", "stratified_kfold", "stratified_split",
    "DEFAULT_MAX_DISTANCE", "duplicate_groups", "hash_photos", "near_duplicate_pairs", "photo_hash",
    "DEFAULT_MAX_GROUP", "DuplicateGroups", "collection_groups", "false_partner_note", "group_duplicates",
    "PhotoFacts", "default_index_path", "load_index", "refresh_index",
    "SHARDS_FORMAT", "is_shard_source", "read_shard_info", "write_shards",
    "DEMO_MINERALS", "make_demo_dataset",
]
