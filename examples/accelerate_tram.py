"""TRAM with Hugging Face accelerate: the model, optimizer, data and schedule prepared by an
Accelerator, each step run by TrainStep (both passes, the restore, AdamW's update).

    accelerate launch --num_processes 2 examples/accelerate_tram.py     # GPUs
    torchrun --nproc_per_node 2 examples/accelerate_tram.py             # CPU (gloo) or GPUs

(On CPU, accelerate 1.15's `accelerate launch --cpu` starts one process; torchrun starts two.)
"""
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel, get_linear_schedule_with_warmup

from tram_dist import TRAM, PreviousParams, TrainStep

accelerator = Accelerator(cpu=not torch.cuda.is_available())  # CPU: gloo across processes
torch.manual_seed(0)  # the same initial weights on every process
model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000))
data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 1000, (64, 32))]
loader = DataLoader(data, batch_size=4)   # 4 sequences per process and step
opt = TRAM(model.parameters(), torch.optim.AdamW, nu=1e-5, lr=1e-4)
schedule = get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=len(loader))
model, opt, loader, schedule = accelerator.prepare(model, opt, loader, schedule)
step = TrainStep(model, opt, trust_region=PreviousParams())   # takes accelerate's wrappers
accelerator.print(f"{accelerator.num_processes} processes ({accelerator.distributed_type}), {len(loader)} steps")
for batch in loader:
    metrics = step([batch])            # this process's micro-batches of one global batch
    schedule.step()
    accelerator.print(f"loss {metrics.loss:.3f}  d {metrics.divergence:.2e}  radius {metrics.radius:.2e}")
