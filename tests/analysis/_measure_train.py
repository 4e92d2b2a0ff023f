"""Run by tests/analysis/test_plan.py in a fresh process: ``train`` (or ``plan``) on DATA with CONFIG; prints the
process's peak resident memory (``VmHWM``) and its resident memory before the work (``base``) as JSON."""

import json
import sys


def status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)
                if k in ("VmHWM", "VmRSS")}


def main() -> None:
    data, cfg, what, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
    from feda2v_toolkit.analysis.plan import plan
    from feda2v_toolkit.data.open import open_dataset
    from feda2v_toolkit.plugins import get_registry
    from feda2v_toolkit.training.pipeline import train

    get_registry()
    base = status()["VmRSS"]
    if what == "plan":
        ds = open_dataset(data)
        r = plan(cfg, dim=ds.dim, full_length=ds.seq_len, class_names=ds.class_names, num_samples=len(ds),
                 stored_itemsize=ds.storage_dtype.itemsize,
                 runtime=base)
        print(json.dumps({"total": r.rows[0].train.total, "base": base}))
    else:
        from feda2v_toolkit.runtime.malloc import STREAM_BUFFER_BYTES, reuse_freed_memory

        reuse_freed_memory(STREAM_BUFFER_BYTES)  # as the `train` command does
        train(cfg, data, out=out, seed=0)
        print(json.dumps({"hwm": status()["VmHWM"], "base": base}))


if __name__ == "__main__":
    main()
