"""Perplexity against a direct float64 computation; pads never counted; Table-3 writers."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from tram_dist.data import EvalBlocks, EvalLoader
from tram_dist.evaluate import (eval_summary, evaluate_domains, evaluate_loss, format_table,
                                perplexity, write_eval_json, write_eval_md, zs_average)

V = 11


class Bigram(nn.Module):
    """logits depend on the current token only, so the loss of a token stream does not depend
    on where blocks are cut: any lost or double-counted target changes the total."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.table = nn.Embedding(V, V)
        nn.init.normal_(self.table.weight, std=2.0)

    def forward(self, input_ids, attention_mask=None):
        return (self.table(input_ids),)  # a tuple, like return_dict=False


def stream(n, seed=0):
    return np.random.default_rng(seed).integers(0, V, n).astype(np.uint16)


def direct_nll(model, tokens):
    logp = torch.log_softmax(model.table.weight.detach().double(), -1)
    t = torch.as_tensor(tokens.astype(np.int64))
    return float(-logp[t[:-1], t[1:]].sum()), len(tokens) - 1


@pytest.mark.parametrize("n,block,batch", [(50, 8, 3), (64, 16, 4), (9, 2, 5), (101, 101, 1)])
def test_ppl_matches_float64_over_the_whole_stream(n, block, batch):
    model, tokens = Bigram(), stream(n)
    res = evaluate_loss(model, EvalLoader(EvalBlocks(tokens, block), batch, 0, 1))
    nll, count = direct_nll(model, tokens)
    assert res.num_tokens == count
    assert res.loss_sum == pytest.approx(nll, rel=1e-6)
    assert res.ppl == pytest.approx(math.exp(nll / count), rel=1e-6)


def test_padded_duplicates_are_never_counted():
    model, tokens = Bigram(), stream(40)
    ds = EvalBlocks(tokens, 8)  # 6 blocks over 4 ranks: 2 pads
    total_loss, total_n = 0.0, 0
    for r in range(4):
        res = evaluate_loss(model, EvalLoader(ds, 1, rank=r, world_size=4))
        total_loss += res.loss_sum
        total_n += res.num_tokens
    nll, count = direct_nll(model, tokens)
    assert total_n == count and total_loss == pytest.approx(nll, rel=1e-6)


def test_gpt2_logits_output_and_train_mode_restored():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=V, n_positions=16))
    model.train()
    tokens = stream(30, seed=1)
    ds = EvalBlocks(tokens, 16)
    res = evaluate_loss(model, EvalLoader(ds, 2, 0, 1))
    assert model.training
    model.eval()
    nll = 0.0
    for i in range(len(ds)):
        s = ds[i]
        with torch.no_grad():
            logits = model(input_ids=s["input_ids"][None], attention_mask=s["attention_mask"][None]).logits
        logp = torch.log_softmax(logits[0].double(), -1)
        keep = s["labels"][1:] != -100
        nll -= float(logp[:-1][keep].gather(1, s["labels"][1:][keep][:, None]).sum())
    assert res.num_tokens == len(tokens) - 1
    assert res.loss_sum == pytest.approx(nll, rel=1e-5)


def test_evaluate_domains_and_summary(tmp_path):
    model = Bigram()
    loaders = {name: EvalLoader(EvalBlocks(stream(30, seed=i), 8), 2, 0, 1)
               for i, name in enumerate(["math", "art", "cs"])}
    ppl = evaluate_domains(model, loaders)
    assert list(ppl) == ["math", "art", "cs"]
    assert ppl["art"] == pytest.approx(perplexity(model, loaders["art"]))
    s = eval_summary(ppl, "math")
    assert s["in_domain_ppl"] == ppl["math"]
    assert s["zs_avg"] == pytest.approx((ppl["art"] + ppl["cs"]) / 2) == zs_average(ppl, "math")
    write_eval_json(tmp_path / "eval.json", s, method="tram-x")
    back = json.loads((tmp_path / "eval.json").read_text())
    assert set(back) >= {"train_domain", "domains", "in_domain_ppl", "zs_avg"}
    other = {**s, "domains": {k: v * 2 for k, v in ppl.items()}, "zs_avg": s["zs_avg"] * 2}
    write_eval_md(tmp_path / "eval.md", [("tram-x", s), ("adamw", other)])
    lines = (tmp_path / "eval.md").read_text().splitlines()
    assert lines[0] == "| run | math | art | cs | ZS Avg. |"
    assert lines[2].startswith("| tram-x | ") and lines[3].startswith("| adamw | ")
    assert f"{s['zs_avg']:.2f} |" in lines[2]


def test_table_rejects_mixed_training_domains():
    a = eval_summary({"math": 1.0, "art": 2.0}, "math")
    b = eval_summary({"math": 1.0, "art": 2.0}, "art")
    with pytest.raises(ValueError, match="one training domain per table"):
        format_table([("a", a), ("b", b)])


def test_nan_is_written_as_null_and_cli_tabulates(tmp_path, capsys):
    from tram_dist.evaluate import main

    only = eval_summary({"math": 3.0}, "math")  # no zero-shot domain: ZS Avg. is NaN
    write_eval_json(tmp_path / "a" / "eval.json", only, method="adamw")
    assert json.loads((tmp_path / "a" / "eval.json").read_text())["zs_avg"] is None
    write_eval_json(tmp_path / "b" / "eval.json", eval_summary({"math": 2.0, "art": 4.0}, "math"))
    main([str(tmp_path / "a" / "eval.json"), str(tmp_path / "b" / "eval.json")])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| run | math | art | ZS Avg. |"
    assert out[2] == "| adamw | 3.00 | - | - |" and out[3] == "| b | 2.00 | 4.00 | 4.00 |"
