"""The tables of docs/performance.md's section on the default, rendered from the JSON records.

``benchmarks/fidelity.py`` and ``benchmarks/cost.py`` write the records; the docs show these
renderings, and ``tests/test_docs_default.py`` checks that they match.
"""

from __future__ import annotations

__all__ = [
    "cost_sentence",
    "cost_tables",
    "fidelity_sentence",
    "fidelity_table",
    "precision_table",
    "step_time_sentence",
    "step_time_table",
]


def _distance_cell(config: dict | None) -> str:
    """'distance to explicit (/ exact's); fresh decompositions' of one configuration."""
    if config is None:
        return "—"
    return (
        f"{config['to_explicit'][-1]:.2e} ({config['ratio_to_exact_gap']:.2f}); "
        f"{config['decompositions']:,}"
    )


def fidelity_table(record: dict) -> str:
    """The fidelity table of docs/performance.md, rendered from the benchmark's JSON."""
    looser = [name for name in record["configs"] if name.startswith("tolerance_")]
    lines = [
        "| task | N | matrix updates | exact rule to explicit | default to explicit (/ exact's); "
        "fresh decompositions | rounds per update | default to exact (largest) | "
        + " | ".join(name.replace("_", " ") for name in looser) + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(looser),
    ]
    for name, task in record["tasks"].items():
        configs = task["configs"]
        exact, default = configs["exact"], configs["default"]
        cells = " | ".join(_distance_cell(configs.get(config)) for config in looser)
        lines.append(
            f"| {name} | {task['N']} | {default['matrix_updates']:,} | "
            f"{exact['to_explicit'][-1]:.2e} | {_distance_cell(default)} | "
            f"{default['rotation_rounds'] / default['matrix_updates']:.2f} | "
            f"{max(default['to_exact']):.1e} | {cells} |"
        )
    return "\n".join(lines)


def precision_table(record: dict) -> str:
    """The matmul-precision table of docs/performance.md, from ``fidelity_precision_*.json``:
    per task, each configuration's final distance (/ the exact rule's) and decompositions."""
    emulated = record["emulated_precision"]
    labels = {"default": "float32 (HIGHEST)"}
    labels.update({name: f"{kind} (emulated)" for name, kind in emulated.items()})
    lines = [
        "| task | exact rule to explicit | " + " | ".join(labels.values()) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for name, task in record["tasks"].items():
        configs = task["configs"]
        cells = " | ".join(_distance_cell(configs.get(config)) for config in labels)
        lines.append(f"| {name} | {configs['exact']['to_explicit'][-1]:.2e} | {cells} |")
    return "\n".join(lines)


def cost_tables(record: dict) -> str:
    """The FLOPs, compile and memory tables of docs/performance.md, from the JSON."""
    lines = [
        "| model | every update (frame and application) | a round | Muon | rounds per update "
        "(measured on) | default / Muon | H100 step, projected: default, Muon (recorded) |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, entry in record["flops"].items():
        t, p = entry["total"], record["projection"]["models"][model]
        seconds = p["projected_seconds"]
        recorded = p["recorded_seconds"].get("muon")
        check = f" ({1e3 * recorded:.2f})" if recorded else " (not recorded)"
        lines.append(f"| {model} | {t['base']:.3g} | {t['round']:.3g} | {t['muon']:.3g} | "
                     f"{p['rounds_per_update']:.2f} ({p['rates_from']}) | "
                     f"{p['flops_over_muon']:.3f} | {1e3 * seconds['default']:.2f} ms, "
                     f"{1e3 * seconds['muon']:.2f} ms{check} |")  # fmt: skip
    lines += ["", "| model | SGD | default | Muon | default / Muon | dot ops: SGD, default, Muon |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for model, entry in record["compile"].items():
        m, d = entry["median_seconds"], entry["dot_ops"]
        lines.append(f"| {model} | {m['sgd']:.1f} s | {m['default']:.1f} s | {m['muon']:.1f} s | "
                     f"{entry['default_over_muon']:.2f} | {d['sgd']}, {d['default']}, "
                     f"{d['muon']} |")  # fmt: skip
    if "compile_parts" in record:
        lines += ["", _compile_parts_table(record["compile_parts"])]
    mem = record["memory"]
    b = mem["state_bytes"]
    lines += ["", "| state | bytes | / preconditioned matrices |", "|---|---|---|"]
    for name in ("default", "sgd_momentum", "adam", "muon"):
        lines.append(
            f"| {name} | {b[name]:,} | {b[name] / mem['preconditioned_matrix_bytes']:.3f} |"
        )
    if "lapack" in record:
        lapack = record["lapack"]
        m, n = lapack["shape"]
        lines += ["", f"| jitted function (W {m} x {n}, one {n} x {n} LU solve) | ms |",
                  "|---|---|"]  # fmt: skip
        labels = {
            "products_alone": "W^T [W W] alone",
            "solve_alone": "the LU solve alone",
            "products_then_solve": "W^T [W W], then the LU solve of its n x n block",
            "four_nxn_products_alone": "four n x n products alone",
            "products_then_four_nxn_products": "W^T [W W], then four n x n products",
        }
        for key, label in labels.items():
            lines.append(f"| {label} | {lapack['median_ms'][key]:.1f} |")
    return "\n".join(lines)


def _compile_parts_table(parts: dict) -> str:
    """Per-matrix compile seconds of the update, whole and in parts, and the projections."""
    columns = ("default", "tracked_only", "fresh_only", "muon")
    lines = [
        "| model: matrix | default | tracked only | fresh only | Muon |",
        "|---|---|---|---|---|",
    ]
    for model, entry in parts.items():
        for shape, seconds in entry["median_seconds"].items():
            cells = " | ".join(f"{seconds[c]:.2f} s" for c in columns)
            lines.append(f"| {model}: {shape.replace('x', ' x ')} | {cells} |")
        projected = entry["projected_over_muon"]
        cells = " | ".join(f"{projected[c]:.2f}" for c in columns[:-1])
        lines.append(
            f"| {model}: step / Muon's, projected (SGD step {entry['sgd_step_seconds']:.2f} s) "
            f"| {cells} | 1 |"
        )
    return "\n".join(lines)


def _ratio(value: float) -> str:
    return f"{value:.2f}"


def step_time_table(idle: dict, busy: dict) -> str:
    """Step time of the CNN's contenders over plain SGD's, idle and with a busy process."""
    lines = [
        "| contender | idle | one busy process beside it |",
        "|---|---|---|",
    ]
    names = {"default": "the default", "svd": '`method="svd"` (exact)', "muon": "Muon"}
    for key, label in names.items():
        lines.append(
            f"| {label} | {_ratio(idle['target1_cnn']['ratio_to_sgd'][key])} | "
            f"{_ratio(busy['target1_cnn']['ratio_to_sgd'][key])} |"
        )
    return "\n".join(lines)


def step_time_sentence(idle: dict, busy: dict) -> str:
    """README's sentence on the default's step time (CNN, 2-core CPU)."""
    i, b = idle["target1_cnn"]["ratio_to_sgd"], busy["target1_cnn"]["ratio_to_sgd"]
    return (
        f"the default's step costs {_ratio(i['default'])}x plain SGD's on an idle 2-core CPU "
        f"(Muon: {_ratio(i['muon'])}x) and {_ratio(b['default'])}x with a busy process beside "
        f"it (Muon: {_ratio(b['muon'])}x)"
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
    models = record["projection"]["models"]
    compile_ratios = sorted(e["default_over_muon"] for e in record["compile"].values())
    memory = record["memory"]["default_state_over_matrices"]
    per_model = ", ".join(f"{m['flops_over_muon']:.3f}x on {name}" for name, m in models.items())
    steps = ", ".join(f"{m['default_over_muon']:.2f}x" for m in models.values())
    return (
        f"its matmul FLOPs per update, at the rounds per update the fidelity record measured, "
        f"are {per_model} Muon's, and its H100 step projected from recorded costs is {steps} "
        f"Muon's (in that order); its training step "
        f"compiles {compile_ratios[0]:.1f}-{compile_ratios[-1]:.1f}x longer than Muon's on "
        f"CPU; its state is {memory:.2f}x the bytes of the matrices it preconditions"
    )
