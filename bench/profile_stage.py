"""Where an alignkit stage's step time goes: torch.profiler over the benchmark's own work.

    .venv/bin/python bench/profile_stage.py --stage grpo [--steps 8] [--rows 25] [--sort self_cpu_time_total]

Runs the same in-process stage as `alignkit_side.py` (same model, data and options; run `make bench`
or `bench/run.py --quick` once first to build bench/.work/) with the profiler recording CPU ops and
Python-level module calls, then prints the top ops and writes a Chrome trace to
bench/.work/profile-<stage>.json (open it in chrome://tracing or https://ui.perfetto.dev).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import alignkit_side  # noqa: E402
import common  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", required=True, choices=sorted(alignkit_side.STAGE_SPECS))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--sort", default="self_cpu_time_total")
    parser.add_argument("--shapes", action="store_true", help="group the ops by input shape")
    args = parser.parse_args(argv)
    if not common.PATHS.manifest.exists():
        sys.exit("bench/.work/ is not built: run `.venv/bin/python bench/run.py --quick` first")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    common.set_threads()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from alignkit.config import resolve_config

    module_name, cls_name, _, _ = alignkit_side.STAGE_SPECS[args.stage]
    module = importlib.import_module(module_name)
    with tempfile.TemporaryDirectory(prefix=f"profile-{args.stage}-") as out:
        cfg = resolve_config(getattr(module, cls_name), None, alignkit_side.stage_argv(args.stage, args.steps, out))
        with profile(activities=[ProfilerActivity.CPU], with_stack=False, record_shapes=args.shapes) as prof:
            module.run(cfg)
    print(prof.key_averages(group_by_input_shape=args.shapes).table(sort_by=args.sort, row_limit=args.rows))
    trace = common.WORK_DIR / f"profile-{args.stage}.json"
    prof.export_chrome_trace(str(trace))
    print(f"trace: {trace} (torch {torch.__version__}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
