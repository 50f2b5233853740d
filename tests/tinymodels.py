"""Tiny models built from configs (no download) and small batches for the tests."""
import torch

VOCAB = 96


def tiny_gpt2(seed: int = 0, dtype=torch.float32, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32,
               bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg.update(overrides)
    model = GPT2LMHeadModel(GPT2Config(**cfg)).to(dtype)
    model.train()  # dropout is 0: train mode is deterministic
    return model


def lm_batch(n: int = 4, seq: int = 12, seed: int = 1, start_index: int = 0, pad_last: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    if pad_last:
        mask[-1, -pad_last:] = 0
        labels[-1, -pad_last:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "sample_index": torch.arange(start_index, start_index + n)}


def split(batch, sizes):
    out, start = [], 0
    for s in sizes:
        out.append({k: v[start:start + s] for k, v in batch.items()})
        start += s
    return out


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}
