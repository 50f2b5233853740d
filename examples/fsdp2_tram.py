"""TRAM under FSDP2, as the README shows it (CPU with gloo, or GPUs with nccl and bf16):

    torchrun --nproc_per_node 2 examples/fsdp2_tram.py
"""
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import GPT2Config, GPT2LMHeadModel

from tram_dist import TRAM, PreviousParams, TrainStep

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)
torch.manual_seed(0)  # the same initial weights on every rank
model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000)).to(device)
mesh = init_device_mesh(device.type, (dist.get_world_size(),))
mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cuda else torch.float32)
for block in model.transformer.h:
    fully_shard(block, mesh=mesh, mp_policy=mp)
fully_shard(model, mesh=mesh, mp_policy=mp)
opt = TRAM(model.parameters(), torch.optim.AdamW, nu=1e-5, lr=2e-5)   # FSDP2Engine chosen
step = TrainStep(model, opt, trust_region=PreviousParams())            # binds the model
torch.manual_seed(1 + dist.get_rank())  # each rank its own part of the global batch
for _ in range(3):
    ids = torch.randint(0, 1000, (2, 32), device=device)
    metrics = step([{"input_ids": ids, "labels": ids}])   # one micro-batch of this rank
    if dist.get_rank() == 0:
        print(f"loss {metrics.loss:.3f}  d {metrics.divergence:.2e}  radius {metrics.radius:.2e}")
dist.destroy_process_group()
