"""The paper's reported results (Huang et al., CVPR 2017), for comparison tables."""
from __future__ import annotations

__all__ = ["PAPER_EPOCHS", "TABLE2", "TABLE2_DATASETS", "TABLE3"]

# Training epochs of the paper's recipes (Section 4.2), per dataset without the "+" of augmentation.
PAPER_EPOCHS = {"cifar10": 300, "cifar100": 300, "svhn": 40, "imagenet": 90}

TABLE2_DATASETS = ("cifar10", "cifar10+", "cifar100", "cifar100+", "svhn")

# Table 2: test error (%) per dataset; None where the paper gives no number.
TABLE2: dict[str, tuple[float | None, ...]] = {
    "densenet40_k12": (7.00, 5.24, 27.55, 24.42, 1.79),
    "densenet100_k12": (5.77, 4.10, 23.79, 20.20, 1.67),
    "densenet100_k24": (5.83, 3.74, 23.42, 19.25, 1.59),
    "densenet_bc100_k12": (5.92, 4.51, 24.15, 22.27, 1.76),
    "densenet_bc250_k24": (5.19, 3.62, 19.64, 17.60, 1.74),
    "densenet_bc190_k40": (None, 3.46, None, 17.18, None),
}

# Table 3: ImageNet validation error (%): (top-1 single-crop, top-1 10-crop, top-5 single-crop, top-5 10-crop).
TABLE3: dict[str, tuple[float, float, float, float]] = {
    "densenet121": (25.02, 23.61, 7.71, 6.66),
    "densenet169": (23.80, 22.08, 6.85, 5.92),
    "densenet201": (22.58, 21.46, 6.34, 5.54),
    "densenet264": (22.15, 20.80, 6.12, 5.29),
}
