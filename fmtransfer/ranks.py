"""The process layout that launchers announce through the environment (``RANK``, ``WORLD_SIZE``, ...).

A stray ``RANK`` or ``WORLD_SIZE`` left in a shell changes what a stage does without anything on its command line:
``curate`` under ``RANK=1`` only embeds its share and stops, under ``RANK=0 WORLD_SIZE=2`` it waits for shards that
nobody writes, and Lightning logs nothing off rank 0. So every layout that cannot complete is refused here, and
one that was switched on by the environment is said out loud.
"""

from __future__ import annotations

import os

from fmtransfer.errors import ConfigError

#: variables that name this process's place; the launcher's own markers are checked separately
LAYOUT_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
#: set by torchrun, Lightning's DDP launcher, accelerate and DeepSpeed (torch.distributed's env:// needs it), but
#: not by a shell that merely kept RANK / WORLD_SIZE from an earlier job
LAUNCHER_VAR = "MASTER_ADDR"

_UNSET = ("unset RANK WORLD_SIZE LOCAL_RANK for a single process, or start the ranks with torchrun "
          "(python -m torch.distributed.run --nproc-per-node=N -m fmtransfer ...)")


def environment_layout() -> str:
    """The layout variables that are set, as ``RANK=1 WORLD_SIZE=2`` ('' when none is)."""
    return " ".join(f"{k}={os.environ[k]}" for k in (*LAYOUT_VARS, LAUNCHER_VAR) if k in os.environ)


def _int_var(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} in the environment is not an integer; {_UNSET}") from None


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes: (0, 1) when no layout variable is set.

    ``RANK`` falls back to ``LOCAL_RANK`` (Lightning's launcher sets only that on one node).

    Raises:
        ConfigError: a layout that cannot complete: a non-integer, ``WORLD_SIZE < 1``, a rank outside
            ``[0, WORLD_SIZE)``, ``WORLD_SIZE`` without a rank, or several ranks with no launcher (no
            ``MASTER_ADDR``), which is what a stray ``RANK`` / ``WORLD_SIZE`` in the shell looks like.
    """
    rank_var, local, world_var = _int_var("RANK"), _int_var("LOCAL_RANK"), _int_var("WORLD_SIZE")
    if rank_var is None and local is None and world_var is None:
        return 0, 1
    env = environment_layout()
    rank = rank_var if rank_var is not None else local
    if rank is None:
        raise ConfigError(f"{env} from the environment names no RANK for this process; {_UNSET}")
    world = 1 if world_var is None else world_var
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} with WORLD_SIZE={world} ({env} from the environment): expected "
                          f"0 <= RANK < WORLD_SIZE; {_UNSET}")
    if world > 1 and LAUNCHER_VAR not in os.environ:
        raise ConfigError(f"{env} from the environment, but no launcher started this process ({LAUNCHER_VAR} "
                          f"is unset, which torchrun and Lightning set); a stray layout would leave rank 0 "
                          f"waiting or the other ranks writing no results; {_UNSET} (ranks started by hand "
                          f"must set {LAUNCHER_VAR} too)")
    return rank, world
