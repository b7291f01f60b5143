"""What fits where: the per-GPU memory estimate of docs/scale.md#what-fits-where, as a table.

  python bench/scale_memory.py            # prints the markdown table of docs/scale.md

An estimate from a formula (written out in docs/scale.md), not a measurement.
"""

from __future__ import annotations

GB = 1e9
# (total parameters incl. the vision tower, text layers, hidden, intermediate, KV width, vocab)
MODELS = {
    "Qwen2.5-VL-3B": dict(params=3.75e9, layers=36, hidden=2048, inter=11008, vocab=151936),
    "Qwen2.5-VL-7B": dict(params=8.29e9, layers=28, hidden=3584, inter=18944, vocab=152064),
}
TOKENS = (
    8 * 1024
)  # tokens per GPU in one training forward: 8 rollouts of 1024 prompt + completion tokens
COMPLETION = 8 * 256  # completion tokens among them
BUDGET = (
    0.9 * 80
)  # an 80 GB card with 10% headroom (CUDA context, fragmentation, the vision tower's activations)
MODES = {
    # name: (bytes a parameter: trained state, frozen weights; sharded; activation bytes; --set)
    # LoRA's adapters (rank 16 on q/k/v/o, ~10M parameters, 0.2 GB of state) are left out
    "full, DDP, fp32": (16, 4, False, 4, "distributed=ddp"),
    "full, FSDP, bf16": (16, 2, True, 2, "distributed=fsdp dtype=bfloat16"),
    "LoRA r=16, DDP, bf16": (0, 2, False, 2, "lora_rank=16 lora_alpha=32 dtype=bfloat16"),
}


def estimate(model: dict, mode: str, gpus: int, checkpointing: bool) -> float:
    trained, frozen, sharded, act, _ = MODES[mode]
    N, L, h, inter, V = (model[k] for k in ("params", "layers", "hidden", "inter", "vocab"))
    state = (trained + frozen) * N  # policy (+ reference) or LoRA base
    if sharded:
        state = state / gpus + 2 * 2 * (N / L)  # + two gathered bf16 layers in flight
    per_layer = act * (8 * h + 4 * inter)  # bytes a token keeps per decoder layer for backward
    activations = TOKENS * (L * act * h + per_layer) if checkpointing else TOKENS * L * per_layer
    logits = (
        TOKENS * V * act + COMPLETION * V * 12
    )  # all positions' logits, fp32 log-softmax of the completion
    return (state + activations + logits) / GB


def table() -> str:
    rows = [
        "| model | mode | checkpointing | 1 x 80 GB | 8 x 80 GB "
        "| command (8 GPUs; 1 GPU: drop torchrun) |",
        "|---|---|---|---|---|---|",
    ]
    for name, model in MODELS.items():
        for mode, (*_, extra) in MODES.items():
            for ckpt in (False, True):
                cells = []
                for gpus in (1, 8):
                    gb = estimate(model, mode, gpus, ckpt)
                    cells.append(f"{'fits' if gb <= BUDGET else 'no'} ({gb:.0f} GB)")
                command = (
                    "`torchrun --nproc_per_node 8 -m sf_train train --set task=jsonl "
                    f"data=train.jsonl model=/models/{name}-Instruct {extra}"
                    f"{' gradient_checkpointing=true' if ckpt else ''}`"
                )
                rows.append(
                    f"| {name} | {mode} | {'on' if ckpt else 'off'} | {cells[0]} | {cells[1]} "
                    f"| {command} |"
                )
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
