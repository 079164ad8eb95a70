"""Print the preset table of docs/presets.md (parameter counts measured on the meta device, no memory used).

Run: python scripts/preset_table.py
"""

from __future__ import annotations

import torch

import cpl_cert


def main() -> None:
    print("| preset | layer | conv layers | channels | conv inner | dense layers | dense inner | params 3x32x32 | params 1x28x28 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, spec in cpl_cert.PRESETS.items():
        counts = []
        for shape in ((3, 32, 32), (1, 28, 28)):
            with torch.device("meta"):
                counts.append(cpl_cert.count_parameters(cpl_cert.build_model(name, input_shape=shape, num_classes=10)))
        print(
            f"| `{name}` | {spec.get('layer', 'cpl').upper()} | {spec['conv_depth']} | {spec['channels']} | {spec['conv_inner']} | "
            f"{spec['dense_depth']} | "
            f"{spec['dense_inner']} | {counts[0]:,} | {counts[1]:,} |"
        )


if __name__ == "__main__":
    main()
