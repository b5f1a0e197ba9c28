"""The datasets a stream can be built from, as metadata: class count, protocol defaults, image shape. The
loaders are in cdl_core.data."""
from __future__ import annotations

from dataclasses import dataclass

from cdl_core.errors import ConfigError


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    n_classes: int
    default_n_tasks: int
    image_size: int  # native side in pixels (images are resized to the backbone's input)
    channels: int
    default_train_per_class: int | None = None  # None: all images
    default_test_per_class: int | None = None
    # ImageNet-style test transform (Resize(S*256/224) + CenterCrop(S)) instead of Resize(S)
    center_crop_test: bool = False
    train_images: int = 0  # images of the full training split (estimates, e.g. the signal cache's size)

    def n_tasks(self, requested: int | None) -> int:
        """The task count (the protocol default when None); it must divide the classes evenly."""
        n_tasks = requested if requested is not None else self.default_n_tasks
        if self.n_classes % n_tasks:
            divisors = ", ".join(str(d) for d in range(1, self.n_classes + 1) if self.n_classes % d == 0)
            raise ConfigError(
                f"data.n_tasks={n_tasks} does not divide the {self.n_classes} classes of {self.name}; use one of: {divisors}"
            )
        return n_tasks


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("fashion_mnist", 10, 5, 28, 1, default_train_per_class=600, default_test_per_class=200, train_images=60000),
        DatasetInfo("cifar100", 100, 10, 32, 3, train_images=50000),
        DatasetInfo("imagenet_r", 200, 10, 224, 3, center_crop_test=True, train_images=24000),  # official split; ours too (80%)
        DatasetInfo("synthetic", 10, 5, 32, 3, default_train_per_class=60, default_test_per_class=30, train_images=600),
    )
}


def get_dataset(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ConfigError(f"data.name={name!r} is not valid; choose one of: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]
