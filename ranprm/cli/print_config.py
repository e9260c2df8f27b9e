"""The composed config as a tree at the start of a run (`print_config=true`), as lightning-hydra-template prints it.

One branch per config group in the order the data flows, then the remaining top-level keys; values resolved, so
the tree shows what the run really uses (`data.root` after `paths.data_dir`, `paths.output_dir`, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import IO

from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

# The data's path first, then the run's machinery; anything else follows in the config's own order.
FIRST_KEYS: tuple[str, ...] = (
    "data",
    "backbone",
    "head",
    "threshold",
    "prm",
    "retrieval",
    "eval",
    "optimizer",
    "trainer",
    "callbacks",
    "logger",
    "paths",
)


def config_tree_order(cfg: DictConfig, first: Sequence[str] = FIRST_KEYS) -> list[str]:
    """The top-level keys of `cfg` in the order the tree shows them (`hydra` is left out: Hydra's own settings)."""
    keys = [k for k in first if k in cfg]
    return keys + [k for k in cfg if k not in keys and k != "hydra"]


@rank_zero_only  # once per run, not once per DDP process
def print_config_tree(cfg: DictConfig, file: IO[str] | None = None) -> None:
    """Print `cfg` as a rich tree: a branch per group (YAML inside), the scalar keys as one last branch."""
    import rich
    import rich.syntax
    import rich.tree
    from rich.console import Console

    tree = rich.tree.Tree("config", style="dim", guide_style="dim")
    scalars: dict[str, object] = {}
    for key in config_tree_order(cfg):
        node = cfg[key]
        if isinstance(node, DictConfig):
            branch = tree.add(str(key), style="bold", guide_style="dim")
            text = OmegaConf.to_yaml(node, resolve=True)
            branch.add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
        else:
            scalars[str(key)] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    if scalars:
        branch = tree.add("run", style="bold", guide_style="dim")
        text = OmegaConf.to_yaml(OmegaConf.create(scalars))
        branch.add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
    console = Console(file=file) if file is not None else rich.get_console()
    console.print(tree)
