"""Training data of the distillers: prompts (DMD2's DM loss needs only text) and optional real images (its GAN).

Sources:
* a prompt file: ``.txt`` (one prompt per line) or ``.jsonl`` (key ``text``, ``prompt`` or ``caption``);
* an image folder with captions in ``metadata.jsonl`` (``file_name`` + caption column) or a ``.txt`` file next to
  each image;
* a ``datasets`` name or local path with an image column and a text column.

Images are decoded lazily (by ``num_workers`` threads when > 0); corrupt or unreadable ones are skipped and counted
(``TrainingData.num_skipped_images``).
Sampling is driven by an explicit ``torch.Generator`` so that a run is reproducible step by step (and a resumed run
draws the same batches as an uninterrupted one).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["TrainingData", "DMD2Data", "load_data", "load_prompt_file", "load_image_folder", "preprocess_image"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PROMPT_KEYS = ("text", "prompt", "caption")


def load_prompt_file(path: str) -> list[str]:
    """Prompts from a ``.txt`` (one per non-empty line) or ``.jsonl`` file."""
    if not path.endswith((".txt", ".jsonl")):
        raise ValueError(f"--prompt_file must end with .txt or .jsonl, got {path!r}")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if path.endswith(".txt"):
        prompts = lines
    else:
        prompts = []
        for line in lines:
            record = json.loads(line)
            key = next((k for k in PROMPT_KEYS if k in record), None)
            if key is None:
                raise ValueError(
                    f"--prompt_file: every line of {path} needs one of the keys {PROMPT_KEYS}: {line[:80]}"
                )
            prompts.append(str(record[key]))
    if not prompts:
        raise ValueError(f"--prompt_file {path!r} contains no prompts")
    return prompts


def load_image_folder(folder: str, caption_column: str = "text") -> list[tuple[str, str]]:
    """(image path, caption) pairs from ``metadata.jsonl`` or ``<image>.txt`` sidecar files."""
    metadata = os.path.join(folder, "metadata.jsonl")
    pairs = []
    if os.path.exists(metadata):
        with open(metadata, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    pairs.append((os.path.join(folder, record["file_name"]), str(record.get(caption_column, ""))))
    else:
        for name in sorted(os.listdir(folder)):
            stem, ext = os.path.splitext(name)
            caption_file = os.path.join(folder, stem + ".txt")
            if ext.lower() in IMAGE_EXTENSIONS and os.path.exists(caption_file):
                with open(caption_file, encoding="utf-8") as f:
                    pairs.append((os.path.join(folder, name), f.read().strip()))
    if not pairs:
        raise ValueError(f"--train_data_dir {folder!r} has no captioned images (metadata.jsonl or <image>.txt)")
    return pairs


def preprocess_image(image, resolution: int) -> torch.Tensor:
    """PIL image -> (3, res, res) float tensor in [-1, 1]: resize the short side, centre crop."""
    from PIL import Image

    image = image.convert("RGB")
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


class _LazyColumn:
    """Read-only view of one column of a ``datasets.Dataset``; rows are decoded only when sampled."""

    def __init__(self, dataset, column: str):
        self.dataset, self.column = dataset, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[int(index)][self.column]


@dataclass
class TrainingData:
    """Prompts for the networks and, optionally, captioned real images (e.g. for DMD2's GAN discriminator)."""

    prompts: list[str]
    images: list = field(default_factory=list)  # image paths or PIL images / dataset rows
    image_captions: list[str] = field(default_factory=list)
    resolution: int = 512
    num_skipped_images: int = 0
    num_workers: int = 0

    @property
    def has_images(self) -> bool:
        return len(self.images) > 0

    def sample_prompts(self, batch_size: int, generator: torch.Generator) -> list[str]:
        idx = torch.randint(len(self.prompts), (batch_size,), generator=generator)
        return [self.prompts[i] for i in idx.tolist()]

    def _open(self, item):
        from PIL import Image

        if isinstance(item, str):
            with Image.open(item) as image:
                image.load()
                return image.copy()
        return item

    def _decode(self, index: int):
        """(index, image tensor) or (index, None) if the image cannot be read."""
        try:
            return index, preprocess_image(self._open(self.images[index]), self.resolution)
        except Exception:  # noqa: BLE001 - any decoding failure means "corrupt image"
            return index, None

    def _decode_all(self, indices: list[int]):
        if self.num_workers <= 0 or len(indices) < 2:
            return [self._decode(i) for i in indices]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.num_workers) as pool:  # PIL releases the GIL while decoding
            return list(pool.map(self._decode, indices))

    def sample_images(self, batch_size: int, generator: torch.Generator, max_tries: int = 100):
        """(images (B, 3, H, W) in [-1, 1], captions); unreadable images are skipped, counted and redrawn.

        The indices of a batch are drawn first and decoded together (in parallel with ``num_workers``), so the
        draws do not depend on the number of workers.
        """
        if not self.has_images:
            raise ValueError("no real images: pass train_data_dir or dataset_name")
        images, captions, tries = [], [], 0
        while len(images) < batch_size:
            need = batch_size - len(images)
            tries += need
            if tries > max_tries * batch_size:
                raise RuntimeError(f"could not read {batch_size} images after {tries} tries (all corrupt?)")
            indices = [int(i) for i in torch.randint(len(self.images), (need,), generator=generator)]
            for index, image in self._decode_all(indices):
                if image is None:
                    self.num_skipped_images += 1
                    continue
                images.append(image)
                captions.append(self.image_captions[index])
        return torch.stack(images), captions


DMD2Data = TrainingData  # the former name


def load_data(
    resolution: int,
    prompt_file: str | None = None,
    train_data_dir: str | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    image_column: str = "image",
    caption_column: str = "text",
    max_train_samples: int | None = None,
    cache_dir: str | None = None,
    num_workers: int = 0,
) -> TrainingData:
    """Load prompts and optional images from whichever sources are given (at least one)."""
    if not (prompt_file or train_data_dir or dataset_name):
        raise ValueError("give at least one of prompt_file, train_data_dir or dataset_name")
    if train_data_dir and dataset_name:
        raise ValueError("give only one of train_data_dir or dataset_name")
    images, captions = [], []
    if train_data_dir:
        pairs = load_image_folder(train_data_dir, caption_column)
        pairs = pairs[:max_train_samples] if max_train_samples is not None else pairs
        images, captions = [p for p, _ in pairs], [c for _, c in pairs]
    elif dataset_name:
        import datasets

        dataset = datasets.load_dataset(dataset_name, dataset_config_name, split="train", cache_dir=cache_dir)
        for column, flag in ((image_column, "image_column"), (caption_column, "caption_column")):
            if column not in dataset.column_names:
                raise ValueError(f"--{flag}={column!r} is not a column of {dataset_name}: {dataset.column_names}")
        if max_train_samples is not None:
            dataset = dataset.select(range(min(max_train_samples, len(dataset))))
        images, captions = _LazyColumn(dataset, image_column), [str(c) for c in dataset[caption_column]]
    prompts = load_prompt_file(prompt_file) if prompt_file else list(captions)
    if max_train_samples is not None:
        prompts = prompts[:max_train_samples]
    return TrainingData(prompts, images, captions, resolution, num_workers=num_workers)
