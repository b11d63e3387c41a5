"""The accelerator suite: step time, linalg scaling and float32 equivalence, in one run.

One command for one GPU or TPU. It calls the ``run()`` function of three benchmarks, each
with its own defaults for the flags this script does not set, and writes their records as
the sections of one JSON file:

* ``step_time`` (``benchmarks/step_time.py``): the full training step of the paper's CNN,
  the MLP 784-2048x3-10 and the transformer LM of ``models.py``, the default against SGD,
  Muon (and AdamW, on the transformer), interleaved step by step;
* ``linalg`` (``benchmarks/linalg_scaling.py``): one ``precondition_matrix`` call per
  method as the matrix grows, with its error against ``method="svd"``;
* ``equivalence`` (``benchmarks/equivalence.py --float32``): implicit against explicit
  depth-N training in float32, the precision an accelerator runs in.

The record is rewritten after every section, so a run that is cut off keeps what it
finished. A section that raises is recorded under an ``error`` key and the others still
run; the exit status is then 1.

Usage (from the repository root):

    python benchmarks/accelerator_suite.py                       # every section
    python benchmarks/accelerator_suite.py --quick               # tiny sizes, CPU smoke run (CI)
    python benchmarks/accelerator_suite.py --sections=linalg --sizes=256,512 --out=x.json

Writes ``benchmarks/results/accelerator_suite_<backend>.json`` (with ``--sections`` naming
a subset, the sections are a suffix of the name). With ``--quick`` and no ``--out`` the
file goes to the temporary folder, never into ``benchmarks/results/``.
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile
import time
import traceback

from absl import flags

import equivalence
import linalg_scaling
import step_time
from overparam_experiments import flags as xflags
from overparam_experiments import timing

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
BENCHMARKS = {"step_time": step_time, "linalg": linalg_scaling, "equivalence": equivalence}
SECTIONS = tuple(BENCHMARKS)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The command line; absl checks every value while parsing."""
    fv = flag_values
    xflags.define_platform_flags(out_help="JSON output path (default: see module doc)",
                                 flag_values=fv)  # fmt: skip
    xflags.define_enum_list("sections", ",".join(SECTIONS), SECTIONS, "the sections to run",
                            flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("N", 3, "the depth", lower_bound=1, flag_values=fv)
    xflags.define_enum_list("step-targets", "1,2,3", step_time.TARGETS,
                            "step_time's --targets", flag_values=fv)  # fmt: skip
    xflags.define_int_list("sizes", None, "linalg_scaling's --sizes (default: its own)",
                           lower_bound=1, flag_values=fv)  # fmt: skip
    flags.DEFINE_boolean("synthetic", False, "equivalence on random data of the data sets' "
                         "shapes (always with --quick)", flag_values=fv)  # fmt: skip


def section_argv(name: str, args) -> list[str]:
    """The command line of one section's benchmark, from the suite's flags."""
    quick = ["--quick"] if args.quick else []
    if name == "step_time":
        return ["--N", str(args.N), "--targets", ",".join(args.step_targets), *quick]
    if name == "linalg":
        sizes = ["--sizes", ",".join(map(str, args.sizes))] if args.sizes else []
        return ["--N", str(args.N), *sizes, *quick]
    synthetic = ["--synthetic"] if args.synthetic or args.quick else []
    return ["--float32", "--no-plot", *synthetic, *quick]


def output_path(args) -> pathlib.Path:
    """``--out``, or the default path of the module doc."""
    if args.out:
        return pathlib.Path(args.out)
    import jax

    name = f"accelerator_suite_{jax.default_backend()}"
    if set(args.sections) != set(SECTIONS):
        name += "_" + "_".join(args.sections)
    folder = pathlib.Path(tempfile.gettempdir()) if args.quick else RESULTS_DIR
    return folder / f"{name}{'_quick' if args.quick else ''}.json"


def errors(record: dict) -> list[str]:
    """The sections of a record that failed."""
    return [name for name, section in record["sections"].items() if "error" in section]


def main(args) -> dict:
    """Runs the sections asked for; writes and returns the record (exit 1 if one failed)."""
    xflags.setup_platform(args)
    path = output_path(args)
    record = {"args": vars(args), "sections": {}}
    for name in args.sections:
        benchmark = BENCHMARKS[name]
        argv = section_argv(name, args)
        print(f"\n== {name}: {pathlib.Path(benchmark.__file__).name} {' '.join(argv)}", flush=True)
        begin = time.perf_counter()
        try:
            section = benchmark.run(xflags.parse(benchmark.define_flags, argv))
        except Exception as error:  # the other sections still run; the record says why
            traceback.print_exc()
            section = {"error": f"{type(error).__name__}: {error}"}
        section["seconds"] = time.perf_counter() - begin
        record["sections"][name] = section
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"environment": timing.environment(), **record}, indent=2))
        print(f"wrote {path}")
    failed = errors(record)
    if failed:
        print(f"failed sections: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)
    return record


if __name__ == "__main__":
    xflags.run(define_flags, main)
