"""lm-eval through the engine with prefix caching on and off: end-to-end time, its parts, and scores.

    python benchmarks/prefix_eval.py smollm2-135m --tasks hellaswag --limit 500 --device cpu --dtype bfloat16

Each run is a process of its own running what `hyla eval run` runs (`HylaLM`, then `evaluate`), the
two modes alternated `--repeats` times. The end-to-end time is the process's, launch to exit; the
run reports its parts: imports, model load (CUDA-graph capture included), task evaluation and,
within it, the engine's own time, its steps and the prompt tokens it computed (the rest came from
the prefix cache). Prints a table and the ratios of the medians, says whether the scores agree, and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

MODES = ("on", "off")


def measure(args: argparse.Namespace) -> dict:
    """One evaluation in this process, caching as `args.one` says."""
    began = time.perf_counter()
    from hyla.evals.cli import evaluate
    from hyla.evals.lm_eval_model import HylaLM

    imported = time.perf_counter()
    lm = HylaLM(
        pretrained=args.model, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
        max_num_batched_tokens=args.max_num_batched_tokens, cache_memory=args.cache_memory,
        enable_prefix_caching=args.one == "on", enforce_eager=args.enforce_eager,
    )
    loaded = time.perf_counter()
    engine, counts = lm.engine, {"steps": 0, "engine_s": 0.0}
    step, generate = engine.step, engine.generate

    def counted_step():
        counts["steps"] += 1
        return step()

    def timed_generate(*a, **k):
        t = time.perf_counter()
        try:
            return generate(*a, **k)
        finally:
            counts["engine_s"] += time.perf_counter() - t

    engine.step, engine.generate = counted_step, timed_generate
    results = evaluate(lm, args.tasks.split(","), args.limit, tokenizer=args.model)
    done = time.perf_counter()
    stats = engine.stats()
    scores = {f"{task}/{key.split(',')[0]}": value for task, metrics in results["results"].items()
              for key, value in metrics.items() if key.endswith(",none") and isinstance(value, float)}
    return {
        "imports_s": round(imported - began, 2), "load_s": round(loaded - imported, 2),
        "tasks_s": round(done - loaded, 2), "engine_s": round(counts["engine_s"], 2), "steps": counts["steps"],
        "computed_tokens": stats.prompt_tokens_total - stats.prefix_cache_hits_total, "scores": scores,
    }


def run_one(mode: str) -> dict:
    """A measuring process of `mode`; its own record plus the wall time from launch to exit."""
    t = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", mode], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        sys.exit(f"caching {mode} failed:\n{done.stderr[-3000:]}")
    return {"caching": mode, "wall_s": round(wall, 2), **json.loads(done.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="converted hybrid dir, HF dir / hub id, or alias (smollm2-135m)")
    parser.add_argument("--tasks", default="hellaswag")
    parser.add_argument("--limit", type=int, default=500, help="items per task")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences the engine runs at once")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--cache-memory", default="2GiB")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each mode, alternated")
    parser.add_argument("--out", default="prefix_eval.json")
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # a measuring process
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.one:
        print(json.dumps(measure(args)))
        return

    runs = [run_one(mode) for _ in range(args.repeats) for mode in MODES]
    print(f"{args.tasks} x {args.limit} on {args.model}, {args.device} {args.dtype}, batch {args.batch_size} / "
          f"{args.max_num_batched_tokens} tokens{', eager' if args.enforce_eager else ''}")
    print("| caching | end to end s | imports s | load s | tasks s | engine s | steps | tokens computed |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['caching']} | {r['wall_s']} | {r['imports_s']} | {r['load_s']} | {r['tasks_s']} | "
              f"{r['engine_s']} | {r['steps']} | {r['computed_tokens']:,} |")
    medians = {m: {k: statistics.median(r[k] for r in runs if r["caching"] == m) for k in ("wall_s", "tasks_s")}
               for m in MODES}
    ratios = {k: round(medians["off"][k] / medians["on"][k], 2) for k in ("wall_s", "tasks_s")}
    same = all(r["scores"] == runs[0]["scores"] for r in runs)
    print(f"off / on (medians): end to end {ratios['wall_s']}x, task evaluation {ratios['tasks_s']}x")
    for r in runs[:1] if same else runs:
        label = "scores identical in every run" if same else f"scores of a caching-{r['caching']} run"
        print(f"{label}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(r["scores"].items())))
    with open(args.out, "w") as f:
        json.dump({"settings": vars(args) | {"one": None}, "runs": runs, "ratios": ratios, "scores_identical": same},
                  f, indent=2)
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
