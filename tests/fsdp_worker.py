"""Run under ``accelerate launch`` (FSDP2) or plainly by test_fsdp.py: trains the tiny model,
optionally stopping (as Ctrl-C would) after a given step so that ``--resume`` can continue it."""

import sys

from transformers import TrainerCallback

from msn.errors import MsnInterrupted
from msn.noise import NoiseConfig
from msn.train import TrainConfig, run


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise KeyboardInterrupt


class Sharding(TrainerCallback):
    """Each process writes whether its parameters are sharded (FSDP2 makes them DTensors)."""

    def __init__(self, out):
        self.out = out

    def on_train_begin(self, args, state, control, model=None, **kw):
        import json
        from pathlib import Path

        sharded = [type(p).__name__ == "DTensor" for p in model.parameters()]
        Path(self.out, f"sharding.rank{args.process_index}").write_text(
            json.dumps({"world": args.world_size, "sharded": all(sharded)}))


if __name__ == "__main__":
    model, data, out, batch, stop_at, resume = sys.argv[1:7]
    cfg = TrainConfig(model=model, data=data, output_dir=out, max_steps=8, lr=1e-3, batch_size=int(batch), warmup=0,
                      save_steps=4, logging_steps=1, save_total_limit=0, noise=NoiseConfig(num_spans=2),
                      resume=resume == "resume")
    try:
        run(cfg, callbacks=[Sharding(out), *([StopAt(int(stop_at))] if int(stop_at) else [])])
    except MsnInterrupted:
        sys.exit(3)
