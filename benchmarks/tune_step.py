"""SFT and DPO step time: kiln's CPU head (answer tokens only) against TRL's own fused head.

    python benchmarks/tune_step.py [--stage dpo] [--profile small] [--steps 4] [--rounds 2]
    python benchmarks/tune_step.py --stage sft --checkpoint BASE_MODEL --data SFT_DATA

Two trainers are built as dpo_model (or sft_model) builds them, from the profile's SFT (base)
checkpoint and dpo_data (sft_data) in `data/work/<profile>/`, or the folders given, with the same
seed, so the same adapter init: one keeps TRL's head, the other gets `score_completions_only`. In
this one process they take turns on the same batches (a full training step each: for DPO policy
forward, reference forward, backward), so machine noise falls on both. Reports the median wall
and CPU seconds per step of each, the ratio TRL / kiln (>= 1.0 means kiln's step is faster), and
the largest difference of the loss and of the trained gradients between the two (they must train
the same thing).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline.config import load_profile
from pipeline.train.dpo import make_dpo_trainer
from pipeline.train.sft import make_sft_trainer

ROOT = Path(__file__).resolve().parent.parent


def _step(trainer, batch) -> tuple[float, float, float, dict]:
    """One training step's loss (forward and backward, no optimizer step), wall and CPU seconds, LoRA grads."""
    trainer.model.zero_grad()
    wall, cpu = time.perf_counter(), time.process_time()
    loss = trainer.training_step(trainer.model, batch).item()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss, wall, cpu, grads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=("dpo", "sft"), default="dpo")
    ap.add_argument("--profile", default="small")
    ap.add_argument(
        "--checkpoint",
        type=Path,
        help="the checkpoint trained from (default: the profile's sft_model, base_model for sft)",
    )
    ap.add_argument("--data", type=Path, help="dpo_data (sft_data) folder (default: the profile's)")
    ap.add_argument("--steps", type=int, default=4, help="batches per round")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    profile = load_profile(args.profile)
    work = ROOT / "data" / "work" / profile.name
    settings = profile.dpo if args.stage == "dpo" else profile.sft
    checkpoint = args.checkpoint or work / ("sft_model" if args.stage == "dpo" else "base_model") / "model"
    data = args.data or work / f"{args.stage}_data"
    if not (checkpoint / "config.json").is_file() or not (data / "train.jsonl").is_file():
        raise SystemExit(f"{checkpoint} or {data}: missing (run up to {args.stage}_data, or pass --checkpoint/--data)")
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for name, cpu_head in (("trl", False), ("kiln", True)):
            torch.manual_seed(settings.seed)
            out = Path(tmp) / name
            trainers[name] = (
                make_dpo_trainer(checkpoint, data, out, settings, cpu_head=cpu_head)[0] if args.stage == "dpo"
                else make_sft_trainer(checkpoint, data, out, settings, [], cpu_head=cpu_head)[0]
            )  # fmt: skip
        for t in trainers.values():
            t.model.train()
            t.current_gradient_accumulation_steps = 1  # set by the training loop, which this bypasses
        loader = iter(trainers["kiln"].get_train_dataloader())
        batches = [next(loader) for _ in range(args.steps)]
        times = {name: ([], []) for name in trainers}
        loss_diff = grad_diff = 0.0
        for _ in range(args.rounds):
            for batch in batches:
                results = {name: _step(t, batch) for name, t in trainers.items()}
                for name, (_, wall, cpu, _) in results.items():
                    times[name][0].append(wall)
                    times[name][1].append(cpu)
                (loss_t, *_, g_t), (loss_k, *_, g_k) = results["trl"], results["kiln"]
                loss_diff = max(loss_diff, abs(loss_t - loss_k))
                grad_diff = max(grad_diff, max((g_t[n] - g_k[n]).abs().max().item() for n in g_t))
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)
    print(
        f"{args.stage}, profile {profile.name}: {checkpoint}, {settings.batch} rows per step "
        f"({tokens:.0f} tokens on average), "
        f"{args.steps} batches x {args.rounds} rounds, {torch.get_num_threads()} threads, device cpu"
    )
    med = {name: (statistics.median(w), statistics.median(c)) for name, (w, c) in times.items()}
    for name, label in (("trl", "TRL's fused head"), ("kiln", "kiln's CPU head")):
        print(f"{label:18s} {med[name][0]:6.2f} s per step, {med[name][1]:6.2f} CPU s (median)")
    print(f"ratio TRL/kiln: {med['trl'][0] / med['kiln'][0]:.2f} wall, {med['trl'][1] / med['kiln'][1]:.2f} CPU")
    print(f"largest difference: loss {loss_diff:.2e}, trained gradient {grad_diff:.2e}")


if __name__ == "__main__":
    main()
