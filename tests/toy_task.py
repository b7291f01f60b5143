"""A tiny text task and model for trainer tests: repeat the prompt's first token."""

import torch

from sf_train.tasks import TrainingTask

EOS, PAD, VOCAB = 1, 0, 32


def toy_samples(split, start, count):
    offset = 0 if split == "train" else 10**6
    out = []
    for i in range(start, start + count):
        g = torch.Generator().manual_seed(offset + i)
        n = 12 + int(torch.randint(0, 8, (1,), generator=g))
        out.append(torch.randint(2, VOCAB, (n,), generator=g))
    return out


def toy_encode(samples):
    P = max(len(s) for s in samples)
    ids = torch.full((len(samples), P), PAD)
    mask = torch.zeros(len(samples), P, dtype=torch.long)
    for b, s in enumerate(samples):
        ids[b, P - len(s) :] = s
        mask[b, P - len(s) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def toy_task() -> TrainingTask:
    return TrainingTask(
        name="toy_copy_first",
        samples=toy_samples,
        encode=toy_encode,
        prompt=lambda s: " ".join(map(str, s.tolist())),
        answer=lambda s: str(int(s[0])),
        is_correct=lambda prompt, completion, answer: int(completion.split()[:1] == [answer]),
        decode=lambda ids: [
            " ".join(str(t) for t in row.tolist() if t not in (EOS, PAD)) for row in ids
        ],
        eos_token_id=EOS,
        pad_token_id=PAD,
    )


def toy_model(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # sharper attention than random init gives, so that p < 1 prunes
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
    return model.eval()
