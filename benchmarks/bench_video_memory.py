"""Peak RSS of build_datasets on a LeRobot v3 video dataset: lazy (decode per row when read) vs eager decoding.

    python benchmarks/bench_video_memory.py [--frames 1500 6000 --size 96]

For each dataset size, one fresh process per mode builds the datasets (decode_video=lazy | eager) and then
reads 64 random rows (the lazy mode decodes them there), and reports its peak RSS (ru_maxrss). A process that
only imports vla_energy.data gives the baseline; "growth" is peak - baseline. Printed: ratios, side by side.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from vla_energy.testing.lerobot_datasets import write_lerobot_v3

_CHILD = """
import json, resource, sys
import numpy as np
from vla_energy.data import DataConfig, build_datasets
mode, root = sys.argv[1], sys.argv[2]
if mode != "import":
    train, _, _ = build_datasets(DataConfig(dataset=root, decode_video=mode, val_fraction=0.0), progress=False)
    for i in np.random.default_rng(0).integers(0, len(train), 64):
        train[int(i)]["image"].load()
print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def textured(e: int, f: int, size: int, camera: int) -> np.ndarray:
    """A frame with detail (a moving gradient plus fixed noise), so PNG and video sizes are realistic."""
    y, x = np.mgrid[0:size, 0:size]
    noise = np.random.default_rng(camera).integers(0, 48, (size, size, 3))
    base = np.stack([(x * 2 + f * 3) % 256, (y * 2 + e * 7) % 256, ((x + y) + 40 * camera) % 256], -1)
    return ((base + noise) % 256).astype(np.uint8)


def peak_kib(mode: str, root: str) -> int:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode, root], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_kib"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, nargs="+", default=[1500, 6000], help="dataset sizes (frames)")
    p.add_argument("--episode_length", type=int, default=50)
    p.add_argument("--size", type=int, default=96, help="image side in pixels")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = peak_kib("import", tmp)
        print(f"{'frames':>8} {'lazy/eager peak':>16} {'lazy/eager growth':>18} {'eager growth x':>15} "
              f"{'lazy growth x':>14}")
        first = None
        for n in a.frames:
            root = str(write_lerobot_v3(Path(tmp) / f"ds{n}", lengths=[a.episode_length] * (n // a.episode_length),
                                        video=True, size=a.size, frame=textured))
            lazy, eager = peak_kib("lazy", root), peak_kib("eager", root)
            growth = (max(lazy - base, 1), max(eager - base, 1))
            first = first or growth
            print(f"{n:>8} {lazy / eager:>16.3f} {growth[0] / growth[1]:>18.3f} {growth[1] / first[1]:>15.2f} "
                  f"{growth[0] / first[0]:>14.2f}")


if __name__ == "__main__":
    main()
