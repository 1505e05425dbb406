"""`make bench`: the cost benchmark, the plugin overhead on two backbone sizes, then a short learning benchmark.

The learning part at full size (9 layouts x 3 seeds, about 45 minutes on 2 cores) runs with
`python benchmarks/bench_learning.py`; here it runs the shared policy, then 3 layouts x 1 seed.
"""

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent

if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    subprocess.run([sys.executable, str(HERE / "bench_cost.py")], check=True)
    subprocess.run([sys.executable, str(HERE / "bench_overhead.py")], check=True)
    subprocess.run([sys.executable, str(HERE / "bench_overhead.py"), "--hidden_size", "768", "--layers", "12",
                    "--image_size", "64", "--steps", "15"], check=True)
    subprocess.run([sys.executable, str(HERE / "bench_learning.py"), "--layouts", "1x24_inbatch", "8x3_local",
                    "8x3_global", "--seeds", "0"], check=True)
