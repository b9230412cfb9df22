"""Training throughput of the pretrain stage against a plain PyTorch loop (same model, data, batch size, augmentation).

    python scripts/bench_train.py                       # ResNet-18 on mnist_global, 3 repeats
    python scripts/bench_train.py --backbones resnet18 tiny_vit --repeats 5 --epochs 3

Each repeat runs the stage (``fmtransfer.tasks.pretrain.pretrain``, Lightning, default config) and the plain
loop back to back, so both see the same machine load. Throughput is training images per second (data
loading + forward + backward + optimiser step; validation excluded) per epoch; the first epoch of each run
is warm-up and dropped. The table shows medians over repeats and the ratio stage / plain (target >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from fmtransfer.config import build, config_dir  # noqa: E402
from fmtransfer.data import RecipeDataModule, load_recipe  # noqa: E402
from fmtransfer.models.backbone import backbone_spec, create_backbone  # noqa: E402
from fmtransfer.models.classifier import Classifier  # noqa: E402
from fmtransfer.tasks.common import build_augment  # noqa: E402
from fmtransfer.tasks.pretrain import pretrain  # noqa: E402


def stage_config(backbone: str, args, run_dir: Path):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="pretrain", overrides=[
            f"backbone={backbone}", f"data={args.data}", f"loader.batch_size={args.batch_size}",
            f"trainer.max_epochs={args.epochs}", f"trainer.limit_train_batches={args.batches}",
            "trainer.limit_val_batches=0", "trainer.enable_model_summary=false", f"run_dir={run_dir}"])


def run_stage(cfg) -> float:
    result = pretrain(cfg)
    per_epoch = result.metrics["train_images_per_s"]["per_epoch"]
    return statistics.median(per_epoch[1:] or per_epoch)


def run_plain(cfg, args) -> float:
    """The loop a practitioner would write by hand, over the stage's own dataset object."""
    torch.manual_seed(cfg.seed)
    recipe = load_recipe(cfg.data)
    dm = RecipeDataModule(recipe, batch_size=args.batch_size, num_workers=cfg.loader.num_workers, seed=cfg.seed)
    loader = dm.dataloader("train", shuffle=True)
    model = Classifier(create_backbone(backbone_spec(cfg.backbone)), dm.num_outputs)
    loss_fn = build(cfg.method.loss, "method.loss")
    optimizer = build(cfg.method.optimizer, "method.optimizer")(model.parameters())
    scheduler = build(cfg.method.scheduler, "method.scheduler")(optimizer, total_steps=args.epochs * args.batches)
    augment = build_augment(cfg)  # the stage augments every batch; so does this loop
    generator = torch.Generator().manual_seed(cfg.seed)
    model.train()
    per_epoch = []
    for _ in range(args.epochs):
        start, images = time.perf_counter(), 0
        for step, (x, y, _rows) in enumerate(loader):
            if step >= args.batches:
                break
            if augment is not None:
                x = augment(x, generator=generator)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            images += len(x)
        per_epoch.append(images / (time.perf_counter() - start))
    return statistics.median(per_epoch[1:] or per_epoch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["resnet18"])
    p.add_argument("--data", default="mnist_global")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is warm-up")
    p.add_argument("--batches", type=int, default=15, help="training batches per epoch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "bench_train.json")
    args = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in args.backbones:
            stage, plain = [], []
            for r in range(args.repeats):
                cfg = stage_config(backbone, args, Path(tmp) / f"{backbone}-{r}")
                stage.append(run_stage(cfg))
                plain.append(run_plain(cfg, args))
                print(f"[{backbone} repeat {r + 1}/{args.repeats}] stage {stage[-1]:.1f} img/s, "
                      f"plain {plain[-1]:.1f} img/s", flush=True)
            rows.append({"backbone": backbone, "stage_images_per_s": statistics.median(stage),
                         "plain_images_per_s": statistics.median(plain),
                         "ratio": statistics.median(stage) / statistics.median(plain),
                         "stage_runs": stage, "plain_runs": plain})

    print(f"\npretrain stage vs plain PyTorch loop: {args.data}, batch {args.batch_size}, "
          f"{args.batches} batches x {args.epochs} epochs (first dropped), median of {args.repeats} runs, "
          f"torch threads {torch.get_num_threads()}\n")
    print("| backbone | stage img/s | plain img/s | ratio (target >= 0.9) |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['backbone']} | {r['stage_images_per_s']:.1f} | {r['plain_images_per_s']:.1f} | {r['ratio']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                    "machine": {"platform": platform.platform(), "torch": torch.__version__,
                                                "threads": torch.get_num_threads()},
                                    "results": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
