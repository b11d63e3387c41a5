"""The tables of docs/performance.md's section on the default, rendered from the JSON records.

``benchmarks/fidelity.py`` and ``benchmarks/cost.py`` write the records; the docs show these
renderings, and ``tests/test_docs_numbers.py`` checks that they match.
"""

from __future__ import annotations

__all__ = [
    "cost_sentence",
    "cost_tables",
    "fidelity_sentence",
    "fidelity_table",
    "step_time_sentence",
    "step_time_table",
]


def fidelity_table(record: dict) -> str:
    """The fidelity table of docs/performance.md, rendered from the benchmark's JSON."""
    lines = [
        "| task | N | exact rule to explicit | default to explicit (/ exact's) | default to "
        "exact | fresh decompositions | tolerance 1e-4: to explicit (/ exact's) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, task in record["tasks"].items():
        configs = task["configs"]
        exact, default = configs["exact"], configs["default"]
        tight = configs.get("tolerance_1e-4")
        tight_cell = (
            f"{tight['to_explicit'][-1]:.2e} ({tight['ratio_to_exact_gap']:.2f})" if tight else "—"
        )
        lines.append(
            f"| {name} | {task['N']} | {exact['to_explicit'][-1]:.2e} | "
            f"{default['to_explicit'][-1]:.2e} ({default['ratio_to_exact_gap']:.2f}) | "
            f"{default['to_exact'][-1]:.1e} | {default['decompositions']:,} of "
            f"{default['matrix_updates']:,} | {tight_cell} |"
        )
    return "\n".join(lines)


def cost_tables(record: dict) -> str:
    """The FLOPs, compile and memory tables of docs/performance.md, from the JSON."""
    lines = [
        "| model | tracked update | fresh update (matmuls; + an SVD) | Muon | tracked / Muon |",
        "|---|---|---|---|---|",
    ]
    for model, entry in record["flops"].items():
        t = entry["total"]
        lines.append(f"| {model} | {t['tracked']:.3g} | {t['fresh_matmuls']:.3g} | "
                     f"{t['muon']:.3g} | {t['tracked'] / t['muon']:.2f} |")  # fmt: skip
    lines += ["", "| model | SGD | default | Muon | default / Muon | dot ops: SGD, default, Muon |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for model, entry in record["compile"].items():
        m, d = entry["median_seconds"], entry["dot_ops"]
        lines.append(f"| {model} | {m['sgd']:.1f} s | {m['default']:.1f} s | {m['muon']:.1f} s | "
                     f"{entry['default_over_muon']:.2f} | {d['sgd']}, {d['default']}, "
                     f"{d['muon']} |")  # fmt: skip
    mem = record["memory"]
    b = mem["state_bytes"]
    lines += ["", "| state | bytes | / preconditioned matrices |", "|---|---|---|"]
    for name in ("default", "sgd_momentum", "adam", "muon"):
        lines.append(
            f"| {name} | {b[name]:,} | {b[name] / mem['preconditioned_matrix_bytes']:.3f} |"
        )
    return "\n".join(lines)


def _ratio(value: float) -> str:
    return f"{value:.2f}"


def step_time_table(record: dict) -> str:
    """Step time of the CNN's contenders over plain SGD's, from one step-time record."""
    load = record["environment"]["load_average"][0]
    lines = [f"| contender | step / SGD's (1-minute load average {load:.1f}) |", "|---|---|"]
    names = {"default": "the default", "svd": '`method="svd"` (exact)', "muon": "Muon"}
    ratios = record["target1_cnn"]["ratio_to_sgd"]
    for key, label in names.items():
        lines.append(f"| {label} | {_ratio(ratios[key])} |")
    return "\n".join(lines)


def step_time_sentence(record: dict) -> str:
    """README's sentence on the default's step time (CNN, 2-core CPU)."""
    ratios = record["target1_cnn"]["ratio_to_sgd"]
    load = record["environment"]["load_average"][0]
    return (
        f"with other jobs running beside it (1-minute load average {load:.1f}), the default's "
        f"step cost {_ratio(ratios['default'])}x plain SGD's, against Muon's "
        f"{_ratio(ratios['muon'])}x"
    )


def fidelity_sentence(record: dict) -> str:
    """README's sentence on the default's fidelity: the worst task and the decomposition rate."""
    tasks = record["tasks"]
    worst = max(tasks, key=lambda t: tasks[t]["configs"]["default"]["ratio_to_exact_gap"])
    ratio = tasks[worst]["configs"]["default"]["ratio_to_exact_gap"]
    fresh = sum(t["configs"]["default"]["decompositions"] for t in tasks.values())
    updates = sum(t["configs"]["default"]["matrix_updates"] for t in tasks.values())
    return (
        f"on {len(tasks)} tasks its distance to the explicit depth-N network is at most "
        f"{ratio:.2f} times the exact rule's ({worst}), with {fresh:,} fresh decompositions "
        f"in {updates:,} matrix updates"
    )


def cost_sentence(record: dict) -> str:
    """README's sentence on FLOPs, compile time and state memory."""
    flops = {m: e["total"]["tracked"] / e["total"]["muon"] for m, e in record["flops"].items()}
    compile_ratios = sorted(e["default_over_muon"] for e in record["compile"].values())
    memory = record["memory"]["default_state_over_matrices"]
    per_model = ", ".join(f"{ratio:.2f}x on {model}" for model, ratio in flops.items())
    return (
        f"its matmul FLOPs per tracked update are {per_model} Muon's; its training step "
        f"compiles {compile_ratios[0]:.1f}-{compile_ratios[-1]:.1f}x longer than Muon's on "
        f"CPU; its state is {memory:.2f}x the bytes of the matrices it preconditions"
    )
