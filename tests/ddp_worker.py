"""Run under torchrun by test_train.py: trains, then each rank writes a digest of its weights."""

import hashlib
import json
import sys

import torch
from transformers import TrainerCallback

from msn.noise import NoiseConfig
from msn.train import TrainConfig, run


class Digest(TrainerCallback):
    def __init__(self, path):
        self.path = path

    def on_train_end(self, args, state, control, model=None, **kw):
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        h = hashlib.sha256(flat.numpy().tobytes()).hexdigest()
        with open(f"{self.path}.rank{args.process_index}", "w") as f:
            json.dump({"sha": h, "world": args.world_size}, f)


if __name__ == "__main__":
    model, data, out, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    cfg = TrainConfig(model=model, data=data, output_dir=out, max_steps=8, lr=1e-3, batch_size=batch,
                      warmup=0, save_steps=100, logging_steps=1, noise=NoiseConfig(num_spans=2))
    run(cfg, callbacks=[Digest(out + "/digest")])
