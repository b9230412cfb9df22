"""``fmtransfer <stage> [hydra overrides]``: a dispatcher over thin ``@hydra.main`` wrappers.

The stage functions live in ``fmtransfer.tasks``; this module only parses, calls and reports.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator

from fmtransfer import __version__
from fmtransfer.tasks.result import StageResult

# stage -> (function, one-line description)
STAGES: dict[str, tuple[str, str]] = {
    "pretrain": ("fmtransfer.tasks.pretrain:pretrain", "train a global backbone + head on a data recipe"),
    "evaluate": ("fmtransfer.tasks.evaluate:evaluate", "score a model on any recipe and split, per region"),
    "curate": ("fmtransfer.tasks.curate:curate",
               "embed, dedup, hierarchical k-means and balanced sampling: a curated manifest (data.subset=...)"),
    "adapt": ("fmtransfer.tasks.adapt:adapt",
              "fit a small regional adapter (LoRA, prompts, probe, ...) over a global base from local labels"),
    "plan": ("fmtransfer.tasks.plan:plan", "read an adapt sweep: learning curves and labels needed per region"),
    "merge": ("fmtransfer.tasks.merge:merge", "fold an adapter into a plain model for export"),
    "export": ("fmtransfer.tasks.export:export",
               "merged model -> ONNX fp32 + INT8, parity and accuracy gates, metadata, Triton repository"),
    "predict": ("fmtransfer.tasks.predict:predict", "run an exported ONNX model over images, without torch"),
    "monitor": ("fmtransfer.tasks.monitor:monitor",
                "drift tests, a label-free accuracy estimate and per-sample OOD scores of new data against a reference"),
    "shadow": ("fmtransfer.tasks.shadow:shadow",
               "run a candidate model beside production on the same inputs: agreement, accuracy, latency, a verdict"),
    "pipeline": ("fmtransfer.tasks.pipeline:pipeline",
                 "the main job: pretrain globally, evaluate globally and zero-shot on a region, write report.md"),
    "registry": ("fmtransfer.tasks.registry:registry",
                 "the artifact registry: list, show, lineage, verify, promote, rollback, history (docs/registry.md)"),
}

# stages whose first words are values of these keys, not overrides: `fmtransfer registry promote <artifact> ...`
POSITIONAL_KEYS: dict[str, tuple[str, ...]] = {"registry": ("action", "artifact")}
# keys a user types that mean something else to Hydra (`region`: the pipeline's recipe group, `stage`: the stage's
# name), as the stage's own keys
KEY_ALIASES: dict[str, dict[str, str]] = {"registry": {"region": "region_name", "stage": "release_stage"}}

# registry actions that only read and print: they get a scratch run dir, removed when they end, instead of a new
# outputs/registry/<time> folder per question (lineage writes its graph and promote / rollback / add keep theirs)
READ_ONLY_ACTIONS: dict[str, tuple[str, ...]] = {"registry": ("list", "show", "verify", "history")}

# stages whose `adapter=<file>` names a file, not an option of the `adapter` config group (adapt's methods);
# the dispatcher passes it on as `adapter_file=<file>`
ADAPTER_FILE_STAGES = ("evaluate", "merge", "export")

USAGE = """usage: fmtransfer <stage> [key=value ...] [-m] [--help]

Stages:
{stages}

Each stage is a Hydra app: `fmtransfer <stage> --help` lists its config groups and keys,
`-m` runs a sweep (e.g. `fmtransfer pretrain -m backbone=resnet18,vit_tiny`), and
`python -m fmtransfer.<stage>` is the same command.

Configs: {configs} (data recipes: its data/; FMTRANSFER_CONFIG_DIR replaces it).
Your own config groups (data/<name>.yaml, experiment/<name>.yaml, ...) without copying these:
`--config-dir DIR`, `hydra.searchpath=[file:///DIR]`, or FMTRANSFER_CONFIG_PATH=DIR[:DIR...].
"""


# Lightning's chatter that says nothing to a user of this framework
QUIET_WARNINGS = (r".*does not have many workers.*", r".*LeafSpec.*", r".*treespec.*",
                  r".*The number of training batches.*smaller than the logging interval.*",
                  r".*overridden `on_after_batch_transfer`.*",
                  r".*You defined a `validation_step` but have no `val_dataloader`.*",  # adapt: no validation
                  r".*module\(s\) in eval mode at the start of training.*")  # frozen normalisation statistics


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """While a stage runs from the command line, hide what says nothing to its user: Lightning's warnings in
    ``QUIET_WARNINGS`` and its litlogger advert, and faiss's INFO line naming the SIMD build it loaded.

    Installed here, for the run only, and restored after it: importing fmtransfer changes no global state.
    """
    lightning_log = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    faiss_log = logging.getLogger("faiss.loader")
    adverts, faiss_level = _DropAdverts(), faiss_log.level
    with warnings.catch_warnings():
        for pattern in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        lightning_log.addFilter(adverts)
        faiss_log.setLevel(logging.WARNING)
        try:
            yield
        finally:
            lightning_log.removeFilter(adverts)
            faiss_log.setLevel(faiss_level)


def _load(stage: str) -> Callable:
    module, func = STAGES[stage][0].split(":")
    return getattr(importlib.import_module(module), func)


def _summary(result: StageResult, scratch: bool = False) -> str:
    lines = [] if scratch else [f"run dir: {result.run_dir}"]
    for key in ("report", "model", "output"):
        if key in result.outputs:
            lines.append(f"{key + ':':8s} {result.outputs[key]}")
    overall = (result.metrics.get("test") or result.metrics).get("overall")
    if overall:
        shown = {k: round(v, 4) for k, v in overall.items() if isinstance(v, float)}
        lines.append(f"metrics: {json.dumps(shown)}")
    return "\n".join(lines)


def positional_overrides(stage: str, args: list[str]) -> list[str]:
    """The leading words of ``args`` (no ``=``, not a flag) as ``key='word'`` for the stage's positional keys
    (quoted: a sha256 prefix of digits stays a string), and its ``KEY_ALIASES`` renamed."""
    keys, args = POSITIONAL_KEYS.get(stage, ()), list(args)
    taken = 0
    while taken < len(keys) and taken < len(args) and "=" not in args[taken] and not args[taken].startswith("-"):
        word = args[taken].replace("'", "\\'")
        args[taken] = f"{keys[taken]}='{word}'"
        taken += 1
    aliases = KEY_ALIASES.get(stage, {})
    return [f"{aliases[a.split('=', 1)[0]]}={a.split('=', 1)[1]}" if a.split("=", 1)[0] in aliases and "=" in a
            else a for a in args]


def scratch_run(stage: str, args: list[str]) -> bool:
    """Whether ``args`` (after :func:`positional_overrides`) ask ``stage`` for an action that only reads, with no
    run dir, sweep or other Hydra setting of the user's: such a run needs no folder of its own."""
    actions = READ_ONLY_ACTIONS.get(stage)
    if not actions or any(a.startswith(("-", "hydra.", "run_dir=")) for a in args):  # flags, sweeps, Hydra's own keys
        return False
    action = next((a.split("=", 1)[1].strip("'\"") for a in args if a.startswith("action=")), "list")
    return action in actions


def run_stage(stage: str, args: list[str]) -> None:
    """Run ``stage`` as a Hydra app with ``args`` as its command line."""
    args = positional_overrides(stage, args)
    scratch = tempfile.mkdtemp(prefix=f"fmtransfer-{stage}-") if scratch_run(stage, args) else None
    if scratch:
        args = [*args, f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]
    import hydra
    from omegaconf.errors import MissingMandatoryValue

    from fmtransfer.config import config_dir, with_search_path
    from fmtransfer.errors import FmtError
    from fmtransfer.lineage.lock import release_all

    try:
        configs = config_dir()
        args = with_search_path(args)  # FMTRANSFER_CONFIG_PATH's dirs join hydra.searchpath
    except FmtError as e:
        print(f"fmtransfer {stage}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    @hydra.main(config_path=str(configs), config_name=stage, version_base="1.3")
    def app(cfg) -> None:
        logging.captureWarnings(True)  # warnings (skipped images, ...) also reach the run's log file
        # imported only now: --help, --cfg and a config error answer without torch, Lightning and timm (~7 s)
        task = _load(stage)
        try:
            with quiet_third_party():
                result = task(cfg)
        except FmtError as e:
            print(f"fmtransfer {stage}: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except MissingMandatoryValue as e:
            key = "adapter" if e.full_key == "adapter_file" else e.full_key  # what the user types
            print(f"fmtransfer {stage}: error: missing value for {key!r}: pass {key}=...", file=sys.stderr)
            raise SystemExit(2) from None
        print(_summary(result, scratch=scratch is not None))

    if stage in ADAPTER_FILE_STAGES:
        args = [f"adapter_file={a.split('=', 1)[1]}" if a.startswith("adapter=") else a for a in args]
    sys.argv = [f"fmtransfer-{stage}", *args]
    try:
        app()
    finally:  # Hydra skips its end-of-run callbacks when the stage exits with status 2: the run dir's lock goes here
        release_all()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        from fmtransfer.config import CONFIG_DIR_ENV, PACKAGE_CONFIGS

        width = max(map(len, STAGES))
        print(USAGE.format(stages="\n".join(f"  {s:<{width}}  {d}" for s, (_, d) in STAGES.items()),
                           configs=os.environ.get(CONFIG_DIR_ENV, PACKAGE_CONFIGS)))
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"fmtransfer {__version__}")
        return 0
    stage = argv[0]
    if stage not in STAGES:
        print(f"fmtransfer: unknown stage {stage!r}; choose one of: {', '.join(STAGES)} "
              f"(fmtransfer --help)", file=sys.stderr)
        return 2
    run_stage(stage, argv[1:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
