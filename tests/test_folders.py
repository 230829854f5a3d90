"""Image folders (e.g. CelebA) as grey levels at a fixed size."""

import numpy as np
import pytest
from PIL import Image

from invertnet.data import load_image_folder


def test_image_folder_is_read_cropped_resized_and_split(tmp_path):
    for index in range(10):
        colour = np.full((30, 20, 3), 25 * index, dtype=np.uint8)
        Image.fromarray(colour).save(tmp_path / f"face{index:02d}.{'png' if index % 2 else 'jpg'}")
    train, labels = load_image_folder(tmp_path, "train", image_size=8, test_fraction=0.2)
    test, _ = load_image_folder(tmp_path, "test", image_size=8, test_fraction=0.2)
    assert train.shape == (8, 1, 8, 8) and test.shape == (2, 1, 8, 8) and (labels == 0).all()
    assert train.min() >= 0 and train.max() <= 255
    levels = sorted({round(v) for v in train[:, 0, 0, 0].tolist()} | {round(v) for v in test[:, 0, 0, 0].tolist()})
    assert len(levels) == 10  # every file once, in one split or the other


def test_image_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="holds 0 image files"):
        load_image_folder(tmp_path)
    (tmp_path / "a.png").write_bytes(b"not an image")
    (tmp_path / "b.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read"):
        load_image_folder(tmp_path)
