"""Photo collections (being split into modules; for now everything lives in decode.py)."""
from mineralnet.data.decode import (DEMO_MINERALS, IMAGE_EXTENSIONS, SPLITS_FORMAT, DatasetIndex,  # noqa: F401
                                    EvalTransform, ImageDataset, ImageDecodeError, Transform, TrainTransform,
                                    _decode_jpeg_fast, _decode_pil, _jpeg_header, add_arguments, build_transforms,
                                    channel_stats, eval_resize, load_image, load_splits, make_demo_dataset, run,
                                    save_splits, scan_dataset, stratified_kfold, stratified_split, verify_image,
                                    warp_crop)
