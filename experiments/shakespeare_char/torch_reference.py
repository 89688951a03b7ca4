"""nanoGPT's baby shakespeare-char run in PyTorch, evaluated exactly like the JAX run.

    python experiments/shakespeare_char/torch_reference.py [SEED] [MANUAL_DIR]

Trains nanoGPT's model (experiments/bench/torch_gpt.py) with nanoGPT's settings for the
`:size=baby` variant (4x4x128, context 64, batch 12, AdamW 1e-3 / 0.9 / 0.99, wd 0.1 on >=2-D
params, warm-up 100, cosine to 1e-4 at 2000, clip 1.0) and prints the mean validation loss over
200 fixed batches of 64 windows (seed 7), the evaluator of experiments/shakespeare_char/eval.py.
"""
import math
import os
import sys
import time

import numpy as np
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from torch_gpt import TorchGPT
from research.data import tiny_shakespeare
from research.data.tokenizers import CharTokenizer
from research.data.windows import WindowSampler
md = sys.argv[2] if len(sys.argv) > 2 else os.environ.get("RESEARCH_SHAKESPEARE_DIR")
tr = tiny_shakespeare.load_text("train", manual_dir=md); va = tiny_shakespeare.load_text("validation", manual_dir=md)
tok = CharTokenizer.from_text(tr + va)
train = torch.from_numpy(tok.encode(tr).astype(np.int64)); val = tok.encode(va)
seed = int(sys.argv[1]) if len(sys.argv) > 1 else 1337
torch.manual_seed(seed)
model = TorchGPT(65, 4, 4, 128, 64, 0.0)
decay = [p for p in model.parameters() if p.dim() >= 2]; nod = [p for p in model.parameters() if p.dim() < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": nod, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99))
def lr_at(it, lr=1e-3, warm=100, decay_it=2000, min_lr=1e-4):
    if it < warm: return lr * (it + 1) / (warm + 1)
    r = (it - warm) / (decay_it - warm); return min_lr + 0.5 * (1 + math.cos(math.pi * r)) * (lr - min_lr)
t0 = time.time()
for it in range(2000):
    for g in opt.param_groups: g["lr"] = lr_at(it)
    ix = torch.randint(len(train) - 64, (12,))
    x = torch.stack([train[i:i+64] for i in ix]); y = torch.stack([train[i+1:i+65] for i in ix])
    _, loss = model(x, y); opt.zero_grad(set_to_none=True); loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
model.eval()
s = WindowSampler(val, 64, 64, seed=7)
with torch.no_grad():
    ls = [model(torch.from_numpy(b["inputs"].astype(np.int64)), torch.from_numpy(b["targets"].astype(np.int64)))[1].item() for b in map(s.batch_at, range(200))]
print("torch seed", seed, "val 200x64:", np.mean(ls), "time", time.time() - t0)
