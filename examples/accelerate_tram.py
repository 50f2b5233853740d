"""TRAM with Hugging Face accelerate: the model, optimizer, data and schedule prepared by an
Accelerator, each step run by TrainStep (both passes, the restore, AdamW's update).

    accelerate launch --num_processes 2 examples/accelerate_tram.py     # GPUs
    torchrun --nproc_per_node 2 examples/accelerate_tram.py             # CPU (gloo) or GPUs
    torchrun --nproc_per_node 2 examples/accelerate_tram.py --deepspeed configs/zero2.json   # ZeRO

(On CPU, accelerate 1.15's `accelerate launch --cpu` starts one process; torchrun starts two.)
With --deepspeed, accelerate's DeepSpeedPlugin partitions the base AdamW (ZeRO-1/2/3) and
tram_on_deepspeed wraps the partitioned base in TRAM.
"""
import argparse
import json
import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DeepSpeedPlugin
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel, get_linear_schedule_with_warmup

from tram_dist import TRAM, PreviousParams, TrainStep
from tram_dist.integrations.accelerate import tram_on_deepspeed

parser = argparse.ArgumentParser()
parser.add_argument("--deepspeed", metavar="CONFIG", help="a DeepSpeed ZeRO config (JSON)")
args = parser.parse_args()
if args.deepspeed:
    config = json.load(open(args.deepspeed))
    config.pop("optimizer", None)  # the optimizer is the AdamW given to prepare below
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what `accelerate launch --use_deepspeed` sets
    if not torch.cuda.is_available():
        PartialState(backend="gloo")  # CPU: accelerate sets up DeepSpeed's ranks only when told the backend
    # no DeepSpeed clipping ("auto" would be 1.0); to clip, use TrainStep(max_grad_norm=...)
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config, gradient_clipping=0.0))
else:
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # CPU: gloo across processes
torch.manual_seed(0)  # the same initial weights on every process
model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000))
data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 1000, (64, 32))]
loader = DataLoader(data, batch_size=4)   # 4 sequences per process and step
if args.deepspeed:  # DeepSpeed partitions the base optimizer; TRAM is built around the partitions
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
else:
    opt = TRAM(model.parameters(), torch.optim.AdamW, nu=1e-5, lr=1e-4)
schedule = get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=len(loader))
model, opt, loader, schedule = accelerator.prepare(model, opt, loader, schedule)
if args.deepspeed:
    opt, trust_region, engine = tram_on_deepspeed(model, opt, "tram-theta-prev", nu=1e-5)
    step = TrainStep(model, opt, trust_region=trust_region, engine=engine)
else:
    step = TrainStep(model, opt, trust_region=PreviousParams())   # takes accelerate's wrappers
accelerator.print(f"{accelerator.num_processes} processes ({accelerator.distributed_type}), {len(loader)} steps")
for batch in loader:
    metrics = step([batch])            # this process's micro-batches of one global batch
    schedule.step()
    accelerator.print(f"loss {metrics.loss:.3f}  d {metrics.divergence:.2e}  radius {metrics.radius:.2e}")
