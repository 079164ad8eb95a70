"""``cpl-cert train``: a thin wrapper over ``cpl_cert.train.train``; defaults come from ``TrainOptions``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..models import PRESETS
from ..train import TrainOptions, default_options, log_path, train
from ..train.augment import AUGMENTS
from ..train.distributed import env_info
from ..train.losses import LOSSES
from ..train.options import OPTIMIZERS
from . import interrupt
from .common import DeviceName, Threads, command_line, console, err_console, fail, handle_errors, set_threads
from .train_display import TrainDisplay

Opt = typer.Option
D = default_options()


LOSS_HELP = (f"{', '.join(LOSSES)}: the paper's multi-class hinge, SLL/AOL's offset cross-entropy, "
             "or the same two on each class pair's certified radius (--margin and --offset are then radii).")


@handle_errors
def train_command(
    ctx: typer.Context,
    out: Annotated[Path, Opt("--out", help="Checkpoint to write (.safetensors; its folder is made when first written); log: <out>.log.jsonl.")],
    model: Annotated[str, Opt("--model", help=f"Preset: {', '.join(PRESETS)}.")] = D["model"],
    dataset: Annotated[str, Opt("--dataset", help="fashion-mnist, mnist, cifar10, cifar100 or folder:PATH.")] = D["dataset"],
    epochs: Annotated[int, Opt("--epochs", help="Number of epochs (the schedule spans all of them).")] = D["epochs"],
    loss: Annotated[str, Opt("--loss", help=LOSS_HELP)] = D["loss"],
    margin: Annotated[float, Opt("--margin", help="Margin of the hinge loss (a radius for radius-hinge).")] = D["margin"],
    offset: Annotated[float, Opt("--offset", help="Logit offset of offset-ce (a radius for radius-ce).")] = D["offset"],
    temperature: Annotated[float, Opt("--temperature", help="Temperature of offset-ce.")] = D["temperature"],
    optimizer: Annotated[str, Opt("--optimizer", help=f"{' or '.join(OPTIMIZERS)} (sgd: Nesterov momentum).")] = D["optimizer"],
    lr: Annotated[float, Opt("--lr", help="Peak learning rate of the triangular schedule.")] = D["lr"],
    momentum: Annotated[float, Opt("--momentum", help="SGD momentum.")] = D["momentum"],
    weight_decay: Annotated[float, Opt("--weight-decay", help="Weight decay.")] = D["weight_decay"],
    batch_size: Annotated[int, Opt("--batch-size", help="Global batch size (split over processes).")] = D["batch_size"],
    augment: Annotated[
        str, Opt("--augment", help=f"{', '.join(AUGMENTS)} (auto: CIFAR reflect-pad 4 + crop + flip; 28x28 zero-pad 2 + crop).")
    ] = D["augment"],
    seed: Annotated[int, Opt("--seed", help="Seed of the initialisation, shuffling and augmentation.")] = D["seed"],
    device: DeviceName = D["device"],
    std_normalize: Annotated[
        bool, Opt("--std-normalize", help="Also divide inputs by the dataset std (multiplies the Lipschitz bound by 1/min std).")
    ] = D["std_normalize"],
    conv_depth: Annotated[int | None, Opt("--conv-depth", help="Number of convolutional CPL layers (overrides the preset).")] = D["conv_depth"],
    channels: Annotated[int | None, Opt("--channels", help="Channels of the convolutional part.")] = D["channels"],
    dense_depth: Annotated[int | None, Opt("--dense-depth", help="Number of dense CPL layers.")] = D["dense_depth"],
    dense_inner: Annotated[int | None, Opt("--dense-inner", help="Inner width of the dense CPL layers.")] = D["dense_inner"],
    conv_inner: Annotated[int | None, Opt("--conv-inner", help="Inner channels of the convolutional CPL layers.")] = D["conv_inner"],
    head: Annotated[str | None, Opt("--head", help="truncation or lln.")] = D["head"],
    data_dir: Annotated[Path | None, Opt("--data-dir", help="Folder with the dataset files.")] = D["data_dir"],
    limit_train: Annotated[int | None, Opt("--train-limit", metavar="N", help="Train on the first N training images only.")] = D["limit_train"],
    eval_limit: Annotated[
        int | None, Opt("--eval-limit", metavar="N", help="Evaluate each epoch on the first N test images only (default: all).")
    ] = D["eval_limit"],
    save_every: Annotated[int, Opt("--save-every", help="Write the checkpoint every N epochs (and at the end).")] = D["save_every"],
    resume: Annotated[bool, Opt("--resume", help="Continue the run saved in --out (same options).")] = D["resume"],
    overwrite: Annotated[bool, Opt("--overwrite", help="Start over even if --out exists.")] = D["overwrite"],
    compile: Annotated[bool, Opt("--compile", help="torch.compile the training model.")] = D["compile"],
    bf16: Annotated[bool, Opt("--bf16", help="bfloat16 autocast for training (evaluation stays float32/float64).")] = D["bf16"],
    freeze_iters: Annotated[
        int | None,
        Opt(
            "--freeze-iters",
            help="Lanczos steps freeze spends on the reported sigma (the step comes from certified bounds whatever the count).",
        ),
    ] = D["freeze_iters"],
    stop_after: Annotated[int | None, Opt("--stop-after", help="Stop cleanly after epoch N (continue later with --resume).")] = D["stop_after"],
    threads: Threads = None,
) -> None:
    """Train a CPL network with the paper's recipe; evaluate clean and certified accuracy every epoch.

    Resumable (--resume), distributed under torchrun (DDP: NCCL on GPUs, gloo on CPUs).
    """
    set_threads(threads)
    options = TrainOptions(
        out=out, model=model, dataset=dataset, epochs=epochs, loss=loss, margin=margin, offset=offset, temperature=temperature,
        optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay, batch_size=batch_size, augment=augment, seed=seed,
        device=device, std_normalize=std_normalize, conv_depth=conv_depth, channels=channels, dense_depth=dense_depth,
        dense_inner=dense_inner, conv_inner=conv_inner, head=head, data_dir=data_dir, limit_train=limit_train, eval_limit=eval_limit,
        save_every=save_every, resume=resume, overwrite=overwrite, compile=compile, bf16=bf16, stop_after=stop_after,
        freeze_iters=freeze_iters, command=command_line(ctx),
    )
    display = TrainDisplay(console, err_console)
    try:
        with display:
            result = train(options, on_event=display)
    except KeyboardInterrupt as exc:  # the display has stopped: the sentence is the last line
        interrupt.ignore_further()
        fail(display.interrupted(exc, out, resume) if env_info().is_main else interrupt.describe(exc), code=interrupt.exit_code(exc))
    if result.history:
        console.print(f"wrote {out} and {log_path(out)} ({result.wall_seconds:.0f} s in all)", highlight=False)
