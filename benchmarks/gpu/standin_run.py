"""Run a Python script (or ``-m module``) as if this machine had one CUDA GPU: the GPU check's dry run.

    python benchmarks/gpu/standin_run.py SCRIPT [ARGS...]
    python benchmarks/gpu/standin_run.py -m MODULE [ARGS...]
    python benchmarks/gpu/standin_run.py -c CODE

The script runs as ``__main__`` inside ``lawa_suite.testing.cuda_standin.cuda_standin()``: ``torch.cuda`` says a
GPU is there, tensors on ``"cuda"`` are stand-ins computing on host data, and what CUDA refuses (mixed devices, a
host tensor in a collective) raises here as it would there. So a dry run walks the same CUDA code paths as the real
check on a CPU-only CI machine, without claiming any GPU timing. The stand-in's counters are at ``DEVICE`` while
the script runs, as ``sys.modules["standin_run"].DEVICE`` (``smoke.py`` and ``averagers.py`` count host
synchronisations there).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from lawa_suite.testing.cuda_standin import StandInDevice, cuda_standin  # noqa: E402

DEVICE: StandInDevice | None = None  # the active stand-in's counters, for the script it runs


def main(argv: list[str]) -> None:
    global DEVICE
    if not argv or argv[0] in ("-h", "--help") or (argv[0] in ("-m", "-c") and len(argv) < 2):
        raise SystemExit(__doc__.strip())
    # scripts find DEVICE at sys.modules["standin_run"] (run as __main__, this module has no other name there)
    sys.modules.setdefault("standin_run", sys.modules[__name__])
    with cuda_standin() as device:
        DEVICE = device
        try:
            if argv[0] == "-m":
                sys.argv = [argv[1], *argv[2:]]
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            elif argv[0] == "-c":
                sys.argv = ["-c", *argv[2:]]
                exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
            else:
                sys.argv = list(argv)
                sys.path.insert(0, str(Path(argv[0]).resolve().parent))  # as `python SCRIPT` puts it first
                runpy.run_path(argv[0], run_name="__main__")
        finally:
            DEVICE = None


if __name__ == "__main__":
    main(sys.argv[1:])
