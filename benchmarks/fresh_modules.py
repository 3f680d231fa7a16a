"""What importing every module of a script's folder afresh each run costs (issue 20).

    python benchmarks/fresh_modules.py [--helpers 40] [--repeats 10]

``run_script`` drops every module from the script's folder before a run, so a changed helper
is never stale. The alternative, re-importing only changed files and their dependents,
needs a stat of every file and a dependency graph. This builds a folder like a training
repo's (a nanoGPT-sized ``model.py``, ``--helpers`` helper modules, a package of 10) and
measures, on a rank of a warm 2-rank cluster: importing all of them afresh, from source
and from ``__pycache__``; taking them from ``sys.modules`` (what tracking saves them from);
the stats tracking needs; and a whole ``run_script`` of a script that imports them.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

import pdlab

# A model module of about nanoGPT's size (~330 lines): classes and functions, no work at import.
BLOCK = '''
class Block{i}(nn.Module):
    """One transformer block."""

    def __init__(self, width: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))
'''


def build(folder: Path, helpers: int) -> None:
    (folder / "pkg").mkdir(parents=True)
    (folder / "model.py").write_text(
        "import torch\nfrom torch import nn\n" + "".join(BLOCK.format(i=i) for i in range(20))
    )
    for i in range(helpers):
        (folder / f"helper_{i}.py").write_text(
            f"import math\nfrom model import Block{i % 20}\n\n"
            + "".join(f"def f{j}(x):\n    return math.sqrt(x) + {j}\n\n" for j in range(20))
        )
    (folder / "pkg" / "__init__.py").write_text("")
    for i in range(10):
        (folder / "pkg" / f"part_{i}.py").write_text(f"import helper_{i % helpers}\nVALUE = {i}\n")
    imports = [f"helper_{i}" for i in range(helpers)] + [f"pkg.part_{i}" for i in range(10)]
    (folder / "train.py").write_text("import model\n" + "".join(f"import {m}\n" for m in imports))


def on_the_rank(folder: str, repeats: int) -> dict[str, float]:
    """Medians in ms on this rank: fresh imports, cached imports, the stats tracking needs."""
    import importlib
    import os
    import sys

    sys.path.insert(0, folder)
    names = ["model", *(n[:-3] for n in os.listdir(folder) if n.startswith("helper_"))]
    names += ["pkg", *(f"pkg.part_{i}" for i in range(10))]

    def drop() -> None:
        for name in names:
            sys.modules.pop(name, None)

    def import_all() -> float:
        start = time.perf_counter()
        for name in names:
            importlib.import_module(name)
        return (time.perf_counter() - start) * 1e3

    fresh, cached, stats = [], [], []
    try:
        for _ in range(repeats):
            drop()
            fresh.append(import_all())
            cached.append(import_all())
            start = time.perf_counter()
            for name in names:
                os.stat(sys.modules[name].__file__)
            stats.append((time.perf_counter() - start) * 1e3)
    finally:
        drop()
        sys.path.remove(folder)
    return {
        "modules": len(names),
        "fresh": statistics.median(fresh),
        "cached": statistics.median(cached),
        "stat": statistics.median(stats),
    }


def run_script_ms(cluster: pdlab.Cluster, script: Path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            cluster.run_script(script)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--helpers", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, pdlab.Cluster(2, device="cpu") as cluster:
        folder = Path(tmp) / "repo"
        build(folder, args.helpers)
        source = cluster.run(on_the_rank, str(folder), args.repeats)[0]
        script_source = run_script_ms(cluster, folder / "train.py", args.repeats)
        compileall.compile_dir(folder, quiet=1)
        pyc = cluster.run(on_the_rank, str(folder), args.repeats)[0]
        script_pyc = run_script_ms(cluster, folder / "train.py", args.repeats)
    print(f"{source['modules']} modules from the script's folder, medians of {args.repeats}:")
    print(f"  import all afresh, from source:       {source['fresh']:7.2f} ms")
    print(f"  import all afresh, from __pycache__:  {pyc['fresh']:7.2f} ms")
    print(f"  take all from sys.modules:            {pyc['cached']:7.2f} ms")
    print(f"  stat every file (tracking's minimum): {pyc['stat']:7.2f} ms")
    print(f"  whole run_script (fresh), source:     {script_source:7.2f} ms")
    print(f"  whole run_script (fresh), pycache:    {script_pyc:7.2f} ms")


if __name__ == "__main__":
    main()
