"""``cpl-cert train``: a thin wrapper over ``cpl_cert.train.train``."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..train import TrainOptions, log_path, train
from .common import DeviceName, check_writable, console, handle_errors

Opt = typer.Option


@handle_errors
def train_command(
    out: Annotated[Path, Opt("--out", help="Checkpoint to write (.safetensors); the log goes to <out>.log.jsonl.")],
    model: Annotated[str, Opt("--model", help="Preset: cpl-s, cpl-m, cpl-l, cpl-xl, cpl-tiny, cpl-xs, cpl-sm.")] = "cpl-xs",
    dataset: Annotated[str, Opt("--dataset", help="fashion-mnist, mnist, cifar10, cifar100 or folder:PATH.")] = "fashion-mnist",
    epochs: Annotated[int, Opt("--epochs", help="Number of epochs (the schedule spans all of them).")] = 10,
    loss: Annotated[str, Opt("--loss", help="hinge (the paper's multi-class hinge), offset-ce (SLL/AOL), or radius-hinge / radius-ce (the same on the certified radius of each class pair; --margin and --offset are then radii).")] = "hinge",
    margin: Annotated[float, Opt("--margin", help="Margin of the hinge loss.")] = 0.7,
    offset: Annotated[float, Opt("--offset", help="Logit offset of offset-ce.")] = 2.1213,
    temperature: Annotated[float, Opt("--temperature", help="Temperature of offset-ce.")] = 0.25,
    optimizer: Annotated[str, Opt("--optimizer", help="adam or sgd (Nesterov momentum).")] = "adam",
    lr: Annotated[float, Opt("--lr", help="Peak learning rate of the triangular schedule.")] = 1e-3,
    momentum: Annotated[float, Opt("--momentum", help="SGD momentum.")] = 0.9,
    weight_decay: Annotated[float, Opt("--weight-decay", help="Weight decay.")] = 0.0,
    batch_size: Annotated[int, Opt("--batch-size", help="Global batch size (split over processes).")] = 256,
    augment: Annotated[str, Opt("--augment", help="auto, none, crop or crop-flip (auto: CIFAR reflect-pad 4 + crop + flip; 28x28 zero-pad 2 + crop).")] = "auto",
    seed: Annotated[int, Opt("--seed", help="Seed of the initialisation, shuffling and augmentation.")] = 0,
    device: DeviceName = "auto",
    std_normalize: Annotated[bool, Opt("--std-normalize", help="Also divide inputs by the dataset std (multiplies the Lipschitz bound by 1/min std).")] = False,
    depth: Annotated[Optional[int], Opt("--depth", help="Number of convolutional CPL layers (overrides the preset).")] = None,
    channels: Annotated[Optional[int], Opt("--channels", help="Channels of the convolutional part.")] = None,
    dense_depth: Annotated[Optional[int], Opt("--dense-depth", help="Number of dense CPL layers.")] = None,
    dense_width: Annotated[Optional[int], Opt("--dense-width", help="Inner width of the dense CPL layers.")] = None,
    conv_inner: Annotated[Optional[int], Opt("--conv-inner", help="Inner channels of the convolutional CPL layers.")] = None,
    head: Annotated[Optional[str], Opt("--head", help="truncation or lln.")] = None,
    data_dir: Annotated[Optional[Path], Opt("--data-dir", help="Folder with the dataset files.")] = None,
    limit_train: Annotated[Optional[int], Opt("--limit-train", help="Train on the first N training images only.")] = None,
    eval_limit: Annotated[Optional[int], Opt("--eval-limit", help="Evaluate each epoch on the first N test images only.")] = None,
    save_every: Annotated[int, Opt("--save-every", help="Write the checkpoint every N epochs (and at the end).")] = 1,
    resume: Annotated[bool, Opt("--resume", help="Continue the run saved in --out (same options).")] = False,
    overwrite: Annotated[bool, Opt("--overwrite", help="Start over even if --out exists.")] = False,
    compile: Annotated[bool, Opt("--compile", help="torch.compile the training model.")] = False,
    bf16: Annotated[bool, Opt("--bf16", help="bfloat16 autocast for training (evaluation stays float32/float64).")] = False,
    freeze_iters: Annotated[Optional[int], Opt("--freeze-iters", help="Power iterations for the final freeze (default: to convergence, at most 2000); any count is sound, see docs/train.md.")] = None,
    stop_after: Annotated[Optional[int], Opt("--stop-after", help="Stop cleanly after epoch N (continue later with --resume).")] = None,
) -> None:
    """Train a CPL network with the paper's recipe; evaluate clean and certified accuracy every epoch.

    Resumable (--resume), distributed under torchrun (DDP: NCCL on GPUs, gloo on CPUs).
    """
    check_writable(out)
    options = TrainOptions(
        out=out, model=model, dataset=dataset, epochs=epochs, loss=loss, margin=margin, offset=offset,
        temperature=temperature, optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay,
        batch_size=batch_size, augment=augment, seed=seed, device=device, std_normalize=std_normalize,
        depth=depth, channels=channels, dense_depth=dense_depth, dense_width=dense_width, conv_inner=conv_inner,
        head=head, data_dir=data_dir, limit_train=limit_train, eval_limit=eval_limit, save_every=save_every,
        resume=resume, overwrite=overwrite, compile=compile, bf16=bf16, stop_after=stop_after, freeze_iters=freeze_iters,
        command="cpl-cert " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )
    result = train(options, echo=lambda msg: console.print(msg, highlight=False))
    if result.history:
        console.print(f"wrote {out} and {log_path(out)} ({result.wall_seconds:.0f} s in all)", highlight=False)
