"""Run by tests/analysis/test_plan.py in a fresh process: ``generate`` (or ``plan``'s prediction of it) from MODEL
with a memory BUDGET (bytes); prints the process's peak resident memory (``VmHWM``) or the prediction as JSON."""

import json
import sys

from _measure_train import status  # this script's directory is first on sys.path


def main() -> None:
    model_path, budget, what, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    from feda2v_toolkit.analysis.plan import plan
    from feda2v_toolkit.model.file import load_model
    from feda2v_toolkit.model.generate import DEFAULT_BATCH, generate
    from feda2v_toolkit.plugins import get_registry

    get_registry()
    model = load_model(model_path)
    if what == "plan":
        base = status()["VmRSS"]  # the runtime with the model loaded: plan adds the generators' weights itself
        r = plan(model.config, lengths=[model.training_length], dim=model.dim, full_length=model.full_length,
                 class_names=model.class_names, memory_budget=budget, runtime=base, sample_batch=DEFAULT_BATCH,
                 stored_itemsize=2)
        row = next(x for x in r.rows if x.length == model.training_length)
        print(json.dumps({"total": row.generate.total, "upsampled": row.generate.upsampled}))
    else:
        from feda2v_toolkit.runtime.malloc import reuse_freed_memory

        reuse_freed_memory()  # as the `generate` command does
        generate(model, out, samples=DEFAULT_BATCH, classes=[model.class_names[0]], memory_budget=budget,
                 progress=False)
        print(json.dumps({"hwm": status()["VmHWM"]}))


if __name__ == "__main__":
    main()
