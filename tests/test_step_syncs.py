"""The training step reads nothing back to the host except every `log_every` steps and at the end of the
epoch (a read-back is a device sync on a GPU), and feeds the model channels_last batches."""
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from mineralnet.config import load_config
from mineralnet.losses import build_loss
from mineralnet.model import FusionNet
from mineralnet.train import LRControl, ModelEma, Progress, TrainParts, build_optimizer, make_accelerator
from mineralnet.train import train_one_epoch
from mineralnet.data import BatchMix


def test_step_reads_back_only_every_log_every_steps_and_keeps_channels_last(monkeypatch):
    cfg = load_config("base", backbone="resnet18", image_size=32, batch_size=4, log_every=3, mixup=0.2,
                      ema_decay=0.9, precision="fp32", channels_last=True, loss="wtopk")
    accelerator = make_accelerator(cfg)
    model = FusionNet("resnet18", (2, 4), 3).to(memory_format=torch.channels_last)
    loss_fn = build_loss("wtopk", k=0.5, alpha=0.2, equal_sizes=True)
    opt = build_optimizer(cfg, model)
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(24, 3, 32, 32, generator=g), torch.randint(0, 3, (24,), generator=g)),
                        batch_size=4, drop_last=True)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    formats = []
    model.register_forward_pre_hook(lambda m, args: formats.append(
        args[0].is_contiguous(memory_format=torch.channels_last)))
    parts = TrainParts(cfg, run=None, split=None, model=model, loss_fn=loss_fn, optimizer=opt, train_loader=loader,
                       val_loader=None, lr_control=LRControl(cfg, opt, len(loader)), progress=Progress(),
                       ema=ModelEma(accelerator.unwrap_model(model), 0.9),
                       mix=BatchMix(3, mixup=0.2, seed=0))
    calls = []
    real_item = torch.Tensor.item

    def counting_item(self):
        caller = sys._getframe(1).f_code.co_filename
        if "torch" not in Path(caller).parts:  # torch's own CPU-side reads (the loader's seed) are no sync
            calls.append(caller)
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    stats = train_one_epoch(parts, accelerator)
    monkeypatch.undo()
    assert parts.progress.step_in_epoch == 6
    assert len(calls) == 6 // 3 + 1  # the log steps 3 and 6, and the epoch's mean loss
    assert formats == [True] * 6
    assert stats["images"] == 24 and stats["loss"] > 0
