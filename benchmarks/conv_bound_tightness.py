"""How tight the certified FFT bound of a 3x3 convolution is, against 1000 power iterations, by image size.

Run: python benchmarks/conv_bound_tightness.py
Prints, per image size, the largest relative excess sigma_upper / sigma_power - 1 over random kernels
(30 seeds x 5 shapes). The bound is always >= the true norm; the excess is the price of the circular
embedding and shrinks like 1/size (docs/math.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cpl_cert.spectral import conv_sigma_upper, power_iteration

SHAPES = [(1, 1), (5, 3), (5, 45), (8, 8), (2, 1)]  # (inner, channels)


def main() -> None:
    for size in (8, 12, 16, 28, 32):
        worst = 0.0
        for seed in range(30):
            g = torch.Generator().manual_seed(seed)
            for inner, channels in SHAPES:
                w = torch.randn(inner, channels, 3, 3, generator=g, dtype=torch.float64)
                upper = conv_sigma_upper(w, (size, size))
                start = torch.randn(1, channels, size, size, generator=g, dtype=torch.float64)
                sigma, _ = power_iteration(
                    lambda x, w=w: F.conv2d(x, w, padding=1), lambda y, w=w: F.conv_transpose2d(y, w, padding=1), start, 1000, 0.0
                )
                worst = max(worst, upper / sigma - 1)
        print(f"{size:>2}x{size:<2}  worst sigma_upper / sigma_power - 1 = {worst:.4f}")


if __name__ == "__main__":
    main()
